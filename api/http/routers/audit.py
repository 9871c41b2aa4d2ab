"""POST /audit: the catalog's suspicious items (read-only), or a person's dismissal of one (a write)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException

from catalens.api.http.fields import checked_category, image_url
from catalens.api.http.guard import write_refusal
from catalens.api.http.schemas import AuditFinding, AuditResponse, DismissResponse, Problem
from catalens.api.http.state import StateDep, api_key_header
from catalens.search.audit import PROBLEMS

router = APIRouter(tags=["catalog audit"])


@router.post("/audit", response_model=AuditResponse | DismissResponse,
             responses={401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
                        422: {"model": Problem}})
async def audit(
    state: StateDep,
    top: Annotated[int | None, Form(ge=1, le=1000, description="at most this many findings")] = 50,
    category: Annotated[str | None, Form(description="only items under this category prefix")] = None,
    problem: Annotated[str | None, Form(description="mislabelled, duplicate or not-a-product")] = None,
    dismiss: Annotated[str | None, Form(max_length=512, description="hide this item's findings until it "
                                                                     "changes (needs X-API-Key)")] = None,
    key: Annotated[str | None, Depends(api_key_header)] = None,
) -> AuditResponse | DismissResponse:
    """Misfiled items, duplicates and photos that are not a product, most probable first; with
    `dismiss`, record that a person found nothing wrong with that item (a write: it needs the key)."""
    if dismiss is not None:
        refusal = write_refusal(state.read_only, state.api_key, key)
        if refusal is not None:
            raise HTTPException(*refusal)

        def run_dismiss() -> None:
            with state.rw.gen_wlock():
                state.service.dismiss_finding(dismiss)

        try:
            await state.run(run_dismiss)
        except KeyError:
            raise HTTPException(404, f"no item {dismiss!r}") from None
        return DismissResponse(dismissed=dismiss)
    if problem is not None and problem not in PROBLEMS:
        raise HTTPException(422, f"problem must be one of {', '.join(PROBLEMS)}")
    category = await checked_category(state, category)

    def run():
        with state.rw.gen_rlock():
            return state.service.catalog_audit(top=top, category=category, problem=problem)

    report = await state.run(run)
    return AuditResponse(items=report.items, seconds=round(report.seconds, 3), dismissed=report.dismissed,
                         findings=[AuditFinding(**finding.to_json(), image_url=image_url(finding.id))
                                   for finding in report.findings])
