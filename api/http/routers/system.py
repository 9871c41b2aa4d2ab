"""The server itself: the web page, GET /health and GET /stats."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from catalens.api.http.schemas import Features, Health, Stats
from catalens.api.http.state import STATIC_DIR, StateDep

router = APIRouter(tags=["server"])


@router.get("/", include_in_schema=False)
async def page(state: StateDep) -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/health", response_model=Health)
async def health(state: StateDep) -> Health:
    return Health(status="ok", items=await state.run(state.service.count))


@router.get("/stats", response_model=Stats)
async def stats(state: StateDep) -> Stats:
    """What the index holds, and what this server can answer for it."""

    def collect() -> dict[str, Any]:
        with state.rw.gen_rlock():
            info = state.service.info()
            categories = state.catalog.items.categories()
            has_ae = state.service.can_score_anomalies()
        return {**info, "has_ae": has_ae,
                "top_categories": dict(sorted(categories.items(), key=lambda pair: -pair[1])[:50])}

    info = await state.run(collect)
    return Stats(
        items=info["items"], categories=info["categories"], failures=info["failures"], backbone=info["backbone"],
        dims=info["dims"], faiss_factory=info.get("faiss_factory"), faiss_configured=info.get("faiss_configured"),
        size_bytes=info.get("size_bytes"),
        modes=info["modes"], default_mode=info["modes"][0] if info["modes"] else "fused",
        features=Features(classify=bool(info["dims"]), anomaly=info["has_ae"], explain=bool(state.catalog.local_features())),
        read_only=state.read_only, top_categories=info["top_categories"], fitted=info["fitted"],
    )
