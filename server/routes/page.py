"""GET /: the demonstration page."""
import html
import pathlib

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from . import state_of

PAGE = pathlib.Path(__file__).resolve().parent.parent / "static" / "index.html"
router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page(request: Request):
    name = state_of(request).config.model_name
    return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(name)))
