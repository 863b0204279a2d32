"""`/v1/models`: the models jobs can name."""

from __future__ import annotations

from fastapi import APIRouter

from service import jobs
from service.api.deps import ContextDep, TenantDep
from service.api.schemas import ModelList, ModelView, error_responses

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(401, 503))


@router.get("", response_model=ModelList)
def list_models(ctx: ContextDep, tenant: TenantDep) -> ModelList:  # noqa: ARG001 - auth only
    """The bundled 'default' model and every registered one."""
    found = [ModelView(**row) for row in jobs.list_models(ctx)]
    return ModelList(data=found, count=len(found))
