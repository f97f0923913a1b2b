"""Every reply of the service is JSON with an `info` object, in English or Spanish."""

from __future__ import annotations

from enum import Enum
from typing import Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict

from service.schemas import session_id_or_empty

InfoType = Literal["success", "warning", "error", "info"]


class Reply(Enum):
    """What happened, with its status and info.type; texts are in MESSAGES."""

    CLOSED = ("closed", 200, "success")
    ALREADY_CLOSED = ("already_closed", 200, "info")
    SESSIONS_CLOSED = ("sessions_closed", 200, "success")
    NO_SESSIONS_TO_CLOSE = ("no_sessions_to_close", 200, "info")
    INVALID = ("invalid", 400, "error")
    UNAUTHORIZED = ("unauthorized", 401, "error")
    UNKNOWN_TOKEN = ("unknown_token", 401, "error")
    SESSION_NOT_FOUND = ("session_not_found", 404, "error")
    NOT_FOUND = ("not_found", 404, "error")
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "error")
    TOO_LARGE = ("too_large", 413, "error")
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415, "error")
    INTERNAL = ("internal", 500, "error")
    UNAVAILABLE = ("unavailable", 503, "error")
    ALIVE = ("alive", 200, "success")
    READY = ("ready", 200, "success")
    NOT_READY = ("not_ready", 503, "error")
    # Requests aiohttp's parser rejects before the app sees them.
    BAD_REQUEST = ("bad_request", 400, "error")
    HEADERS_TOO_LARGE = ("headers_too_large", 431, "error")

    @property
    def status(self) -> int:
        return int(self.value[1])

    @property
    def info_type(self) -> InfoType:
        info_type: InfoType = self.value[2]
        return info_type


MESSAGES: dict[Reply, dict[str, tuple[str, str]]] = {
    Reply.CLOSED: {
        "en": ("Session closed!", "The session has been closed successfully!"),
        "es": ("¡Sesión cerrada!", "¡La sesión se ha cerrado correctamente!"),
    },
    Reply.ALREADY_CLOSED: {
        "en": ("Session already closed", "This session had already been closed."),
        "es": ("Sesión ya cerrada", "Esta sesión ya se había cerrado."),
    },
    Reply.SESSIONS_CLOSED: {
        "en": ("Sessions closed!", "Your sessions have been closed successfully!"),
        "es": ("¡Sesiones cerradas!", "¡Tus sesiones se cerraron correctamente!"),
    },
    Reply.NO_SESSIONS_TO_CLOSE: {
        "en": ("No sessions to close", "There were no open sessions to close."),
        "es": ("No hay sesiones que cerrar", "No había sesiones abiertas que cerrar."),
    },
    Reply.INVALID: {
        "en": ("Invalid request", "Some fields of the request are invalid; see errors."),
        "es": ("Solicitud no válida", "Algunos campos de la solicitud no son válidos; ver errors."),
    },
    Reply.UNAUTHORIZED: {
        "en": ("Authorization required", "Send 'Authorization: Basic <access token>'."),
        "es": ("Autorización requerida", "Envíe 'Authorization: Basic <token de acceso>'."),
    },
    Reply.UNKNOWN_TOKEN: {
        "en": ("Invalid token", "The access token is unknown or has expired."),
        "es": ("Token no válido", "El token de acceso no existe o ha caducado."),
    },
    Reply.SESSION_NOT_FOUND: {
        "en": ("Session not found", "The session does not exist or has expired."),
        "es": ("Sesión no encontrada", "La sesión no existe o ha caducado."),
    },
    Reply.NOT_FOUND: {
        "en": ("Not found", "There is nothing at this path."),
        "es": ("No encontrado", "No hay nada en esta ruta."),
    },
    Reply.METHOD_NOT_ALLOWED: {
        "en": ("Method not allowed", "This path does not accept this method."),
        "es": ("Método no permitido", "Esta ruta no acepta este método."),
    },
    Reply.TOO_LARGE: {
        "en": ("Request too large", "The body must be at most 16 KiB."),
        "es": ("Solicitud demasiado grande", "El cuerpo debe ocupar como máximo 16 KiB."),
    },
    Reply.UNSUPPORTED_MEDIA_TYPE: {
        "en": ("Unsupported media type", "Send 'Content-Type: application/json'."),
        "es": ("Tipo de contenido no admitido", "Envíe 'Content-Type: application/json'."),
    },
    Reply.INTERNAL: {
        "en": ("Internal error", "Something went wrong on our side; please try again."),
        "es": ("Error interno", "Algo salió mal de nuestro lado; inténtelo de nuevo."),
    },
    Reply.UNAVAILABLE: {
        "en": ("Service unavailable", "The service is temporarily unavailable; retry shortly."),
        "es": ("Servicio no disponible", "El servicio no está disponible; reintente en breve."),
    },
    Reply.ALIVE: {
        "en": ("Alive", "The process is running."),
        "es": ("Activo", "El proceso está en marcha."),
    },
    Reply.READY: {
        "en": ("Ready", "Redis answers: this process can close sessions."),
        "es": ("Listo", "Redis responde: este proceso puede cerrar sesiones."),
    },
    Reply.NOT_READY: {
        "en": ("Not ready", "Redis does not answer: sessions cannot be closed now."),
        "es": ("No listo", "Redis no responde: ahora no se pueden cerrar sesiones."),
    },
    Reply.BAD_REQUEST: {
        "en": ("Bad request", "The request is not valid HTTP."),
        "es": ("Solicitud incorrecta", "La solicitud no es HTTP válido."),
    },
    Reply.HEADERS_TOO_LARGE: {
        "en": ("Headers too large", "A request header is too large."),
        "es": ("Cabeceras demasiado grandes", "Una cabecera de la solicitud es demasiado grande."),
    },
}


def language(accept_language: str | None) -> str:
    """'es' when Accept-Language prefers Spanish over English, else 'en'."""
    best, best_q = "en", 0.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        lang = tag.strip().lower().split("-")[0]
        if lang not in ("en", "es"):
            continue
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if q > best_q:
            best, best_q = lang, q
    return best


def info_reply(
    request: web.BaseRequest,
    reply: Reply,
    *,
    errors: dict[str, list[str]] | None = None,
    headers: CIMultiDict[str] | dict[str, str] | None = None,
    closed_sessions: int | None = None,
    beside: dict[str, object] | None = None,
) -> web.Response:
    """The reply's JSON: `info`, and the fields of `beside` next to it."""
    title, message = MESSAGES[reply][language(request.headers.get("Accept-Language"))]
    info: dict[str, object] = {
        "type": reply.info_type,
        "title": title,
        "message": message,
        "sessionId": session_id_or_empty(request.headers.get("SessionID")),
    }
    if closed_sessions is not None:
        info["closedSessions"] = closed_sessions
    if errors is not None:
        info["errors"] = errors
    return web.Response(
        status=reply.status,
        body=orjson.dumps({"info": info} | (beside or {})),
        content_type="application/json",
        headers=headers,
    )
