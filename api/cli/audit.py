"""``catalens audit``: the catalog's misfiled items, duplicates and photos that are not a product."""

from __future__ import annotations

import argparse
import json

from catalens.api.cli.arguments import UsageError, add_command, add_location_arguments, open_service
from catalens.api.tables import format_table


def _why(finding) -> str:
    evidence = finding.evidence
    if finding.problem == "mislabelled":
        inliers = evidence.get("verified_inliers")
        verified = (f"; verified keypoints {inliers['filed']} with its leaf, {inliers['suggested']} with that one"
                    if inliers else "")
        return f"{evidence['level']} differs; looks like {finding.suggested}{verified}"
    if finding.problem == "duplicate":
        kind = "exact copy" if evidence["exact"] else f"near copy ({evidence['similarity']:.3f})"
        return f"{kind} of {', '.join(evidence['ids'][:3])}"
    return f"looks like a {evidence['looks_like']}" if "looks_like" in evidence else "far from every product"


def cmd_audit(args: argparse.Namespace) -> int:
    if args.top is not None and args.top < 1:
        raise UsageError("--top must be at least 1")
    service = open_service(args)
    try:
        if args.dismiss:
            try:
                mark = service.dismiss_finding(args.dismiss)
            except KeyError:
                raise UsageError(f"no item {args.dismiss!r} in this index") from None
            print(f"dismissed {args.dismiss}: its findings stay hidden until the item changes "
                  f"(image or category; {mark['digest'][:12]})")
            return 0
        report = service.catalog_audit(top=args.top, category=args.category, problem=args.problem,
                                       progress=not args.json)
    finally:
        service.close()
    if args.json:
        for finding in report.findings:
            print(json.dumps(finding.to_json(), ensure_ascii=False))
        return 0
    rows = [(rank, f"{f.score:.3f}", f.problem, f.category, f.id, _why(f)) for rank, f in enumerate(report.findings, 1)]
    print(format_table(["#", "score", "problem", "category", "id", "why"], rows) if rows else "no findings")
    hidden = f", {report.dismissed} dismissed" if report.dismissed else ""
    print(f"\n{len(report.findings)} findings in {report.items} items ({report.seconds:.1f}s{hidden}); "
          "score: the probability that the finding is real")
    return 0


def register(commands) -> None:
    p = add_command(
        commands, "audit", "list the catalog's misfiled items, duplicates and photos that are not a product",
        description="Audit the catalog from what the index stores: items that look like another category "
                    "(mislabelled: the suggested category and the level of the path that differs), the same or "
                    "nearly the same image under two ids (duplicate), and placeholders, blank or foreign photos "
                    "(not-a-product). Most probable first; the score is a probability fitted on the catalog itself. "
                    "'anomaly --audit' lists the autoencoder's scores alone.",
        epilog="examples: catalens audit --index shop-index --top 20\n"
               "          catalens audit --index shop-index --json --category Packages/Milk\n"
               "          catalens audit --index shop-index --dismiss sku-17")
    add_location_arguments(p)
    p.add_argument("--top", type=int, default=None, help="list at most this many findings (default: all)")
    p.add_argument("--category", metavar="PREFIX", default=None,
                   help="only items under this category prefix of whole levels (Packages or Packages/Milk)")
    p.add_argument("--problem", choices=("mislabelled", "duplicate", "not-a-product"), default=None,
                   help="only findings of this problem")
    p.add_argument("--json", action="store_true", help="one JSON line a finding")
    p.add_argument("--dismiss", metavar="ID", default=None,
                   help="record that item ID's findings are not real: hidden until the item changes")
    p.set_defaults(run=cmd_audit)
