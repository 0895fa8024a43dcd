"""A read-only status page at ``/`` until the alarm console arrives (Norwegian text).

It shows ids only, never names or addresses: there is no log-in yet.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from hub.store.alarms import AlarmFilter, PgAlarmStore
from hub.store.operations import list_gateways

router = APIRouter(include_in_schema=False)
_OSLO = ZoneInfo("Europe/Oslo")
_PRIORITY = {"critical": "Kritisk", "high": "Høy", "normal": "Normal", "technical": "Teknisk"}
_STATE = {"raised": "Utløst", "acknowledged": "Tatt", "on_site": "På stedet",
          "resolved": "Avsluttet", "cancelled": "Avbrutt"}
_GATEWAY = {"online": "Tilkoblet", "offline": "Frakoblet", "unknown": "Ukjent"}


def _age(since: datetime) -> str:
    seconds = int((datetime.now(UTC) - since).total_seconds())
    return f"{seconds // 60} min {seconds % 60} s"


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p>{escape(empty)}</p>"
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@router.get("/", response_class=HTMLResponse)
async def status_page(request: Request) -> HTMLResponse:
    async with request.app.state.runtime.pool.connection() as conn:
        alarms = await PgAlarmStore().list(conn, AlarmFilter(open_only=True, limit=200))
        gateways = await list_gateways(conn)
    alarm_rows = [
        [_PRIORITY[a["priority"]], _STATE[a["state"]], a["category"], a["resident_id"] or "-",
         a["raised_at"].astimezone(_OSLO).strftime("%d.%m.%Y %H:%M:%S"), _age(a["raised_at"]),
         str(a["id"])]
        for a in alarms
    ]
    gateway_rows = [[g["id"], _GATEWAY.get(g["status"], g["status"])] for g in gateways]
    html = f"""<!doctype html>
<html lang="nb"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="5">
<title>Trygghetsalarm – status</title>
<style>body{{font-family:system-ui,sans-serif;margin:1rem;color:#111}}
table{{border-collapse:collapse;width:100%;margin-bottom:1.5rem}}
th,td{{border:1px solid #767676;padding:.4rem;text-align:left}}</style></head>
<body><main>
<h1>Trygghetsalarm – status</h1>
<p>Oppdateres hvert 5. sekund. Alarmkonsollet med innlogging kommer; dette er en
skrivebeskyttet oversikt. Handlinger gjøres gjennom API-et
(<a href="/api/v1/docs">dokumentasjon</a>).</p>
<h2>Åpne alarmer ({len(alarm_rows)})</h2>
{_table(["Prioritet", "Status", "Kategori", "Beboer", "Utløst", "Alder", "Alarm-id"],
        alarm_rows, "Ingen åpne alarmer.")}
<h2>Gatewayer ({len(gateway_rows)})</h2>
{_table(["Gateway", "Status"], gateway_rows, "Ingen registrerte gatewayer.")}
</main></body></html>"""
    return HTMLResponse(html)
