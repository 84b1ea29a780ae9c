"""The admin API of the versions (``server/versions.py``): list, hot load, weights, retire,
rollback. Bearer-token protected like the rest; a server started without a token takes
admin calls from loopback clients only (a bundle path is a path on this machine).

    GET    /admin/versions                 the versions, the split, the history depth
    POST   /admin/versions                 {name, bundle, weight, wait}: load (201 / 202)
    PATCH  /admin/versions                 {weights: {name: weight}}: new weights
    DELETE /admin/versions/{name}?wait=0   retire: no new requests, in-flight ones finish
    POST   /admin/versions/rollback        the set before the last change, back
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool  # idle threads end, unlike to_thread's
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from moe2edge.runtime.server.config import VersionName, VersionWeight
from moe2edge.runtime.server.state import APIError, ServiceState, get_state, require_token

LOOPBACK = ("127.0.0.1", "::1", "localhost")


async def require_admin(request: Request) -> None:
    """The token (``require_token``); without one configured, loopback clients only."""
    await require_token(request)
    state = get_state(request)
    host = request.client.host if request.client else None
    if not state.config.token and host not in LOOPBACK:
        raise APIError(
            403,
            "the admin API takes calls from this machine only when the server has no token; "
            "start it with --token and send 'Authorization: Bearer <token>'",
            type="permission_error",
        )


router = APIRouter(prefix="/admin/versions", dependencies=[Depends(require_admin)])
State = Annotated[ServiceState, Depends(get_state)]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: VersionName
    bundle: str = Field(min_length=1)  # a bundle directory on the server's machine
    weight: VersionWeight = 0.0  # its share once loaded (0: only requests naming it)
    wait: bool = True  # answer once it serves (201), else at once (202)


class WeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    weights: dict[VersionName, VersionWeight] = Field(min_length=1)


@router.get("")
async def list_versions(state: State) -> dict:
    return state.versions.describe()


@router.post("")
async def load_version(req: LoadRequest, state: State) -> JSONResponse:
    version = state.versions.load(req.name, req.bundle, req.weight)
    if not req.wait:
        return JSONResponse(version.info(), status_code=202)
    await run_in_threadpool(version.ready.wait)
    if version.state == "failed":
        raise APIError(400, f"version {req.name} did not load: {version.error}", param="bundle")
    return JSONResponse(version.info(), status_code=201)


@router.patch("")
async def set_weights(req: WeightsRequest, state: State) -> dict:
    state.versions.set_weights(req.weights)
    return state.versions.describe()


@router.delete("/{name}")
async def retire_version(name: str, state: State, wait: bool = False) -> JSONResponse:
    version = state.versions.retire(name)
    if wait:
        await run_in_threadpool(version.gone.wait)
        return JSONResponse(version.info())
    return JSONResponse(version.info(), status_code=202)


@router.post("/rollback")
async def rollback(state: State) -> dict:
    restored = await run_in_threadpool(state.versions.rollback)
    return {"restored": restored, **state.versions.describe()}
