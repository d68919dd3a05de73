"""Transport security and caller identity, for the stages and every client of them.

Server side, three independent switches (all off by default, for the local mesh):

- TLS: MLMESH_TLS_CERT and MLMESH_TLS_KEY. The stage then serves TLS only.
- mTLS: MLMESH_TLS_CLIENT_CA. gRPC refuses, during the handshake, any caller
  without a certificate that CA signed; the certificate's subject becomes the
  caller's identity.
- Bearer tokens: MLMESH_AUTH_TOKENS_FILE, one token per line with a name and
  its roles. A call without a token gets UNAUTHENTICATED; a token without the
  role a method needs gets PERMISSION_DENIED.

Client side (the CLI, the workflow tasks, the probe, the launcher):
MLMESH_TLS_CA turns TLS on and names the CA that signed the stages'
certificates; MLMESH_TLS_CLIENT_CERT/KEY are the client's own certificate for
mTLS; MLMESH_AUTH_TOKEN (or MLMESH_AUTH_TOKEN_FILE) is sent as
`authorization: Bearer <token>`.

The token file (a Kubernetes Secret or a compose secret, mounted as a file):

    # name      roles              token
    pipelines   pipeline           3f0c...   # runs pipelines: every stage call
    registrar   pipeline,register  9ab1...   # may also register models
    operator    admin              77de...   # everything

Tokens are kept only as sha256 digests in memory and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from services.runtime.handlers import Continuation, MethodHandler, wrap_behaviour
from services.runtime.settings import Settings, SettingsError

log = logging.getLogger(__name__)

# Roles a token may hold. "pipeline" runs stages and follows fits; "register" adds models to
# the registry and chooses what serving serves (both are release decisions, so a separate
# right); "predict" only asks the serving stage for predictions and metadata, so an
# application's token cannot run or read pipelines; "admin" is all of them. A pipeline may
# also predict (the workflow's smoke request after a rollout).
ROLES = ("pipeline", "register", "predict", "admin")
SERVING_SERVICE = "/inference.GRPCInferenceService/"
# The methods that need more than "pipeline".
REGISTER_METHODS = frozenset(
    {
        "/mlmesh.evaluator.v1.EvaluatorService/RegisterModel",
        f"{SERVING_SERVICE}RepositoryModelLoad",
        f"{SERVING_SERVICE}RepositoryModelUnload",
    }
)
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."

AUTHORIZATION = "authorization"
MIN_TOKEN_CHARACTERS = 16  # shorter secrets can be guessed; `openssl rand -hex 32` gives 64
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class Token:
    name: str
    roles: frozenset[str]
    digest: bytes  # sha256 of the token: the secret itself is not kept

    def allows(self, role: str) -> bool:
        if role == "predict" and "pipeline" in self.roles:
            return True
        return "admin" in self.roles or role in self.roles


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def load_tokens(path: str) -> list[Token]:
    """Parse a token file. Errors name the line, never the token on it."""
    tokens: list[Token] = []
    names: set[str] = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        where = f"MLMESH_AUTH_TOKENS_FILE line {number}"
        if len(fields) != 3:
            raise SettingsError(f"{where}: expected 'NAME ROLES TOKEN', found {len(fields)} fields")
        name, roles_text, secret = fields
        if not _TOKEN_NAME.match(name):
            raise SettingsError(f"{where}: the name must be 1-64 letters, digits, '.', '_', '@' or '-'")
        if name in names:
            raise SettingsError(f"{where}: the name {name!r} is used twice")
        roles = frozenset(roles_text.split(","))
        unknown = sorted(roles - set(ROLES))
        if unknown:
            raise SettingsError(f"{where}: unknown role {unknown[0][:20]!r}; roles are {', '.join(ROLES)}")
        if len(secret) < MIN_TOKEN_CHARACTERS or not secret.isascii():
            raise SettingsError(f"{where}: the token must be at least {MIN_TOKEN_CHARACTERS} ASCII characters")
        names.add(name)
        tokens.append(Token(name, roles, _digest(secret)))
    if not tokens:
        raise SettingsError("MLMESH_AUTH_TOKENS_FILE lists no token; every call would be refused")
    return tokens


def required_role(method: str) -> str:
    if method in REGISTER_METHODS:
        return "register"
    return "predict" if method.startswith(SERVING_SERVICE) else "pipeline"


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def check_certificate(path: str, setting: str) -> None:
    """Refuse to start with a certificate that is not PEM, or already expired or not yet valid."""
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise SettingsError(f"{setting}={path[:200]!r} is not a PEM certificate") from None
    now = datetime.now(UTC)
    if certificate.not_valid_after_utc < now:
        raise SettingsError(f"{setting}: the certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    if certificate.not_valid_before_utc > now:
        raise SettingsError(
            f"{setting}: the certificate is not valid before {certificate.not_valid_before_utc:%Y-%m-%d}"
        )


# ---- server -------------------------------------------------------------------------------
def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for a stage, or None for plaintext."""
    if not settings.tls_cert:
        return None
    check_certificate(settings.tls_cert, "MLMESH_TLS_CERT")
    pair = [(_read(settings.tls_key), _read(settings.tls_cert))]
    if settings.tls_client_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(settings.tls_client_ca), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def certificate_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The verified client certificate's subject ("cert:<common name>"), or "" without mTLS."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - identity is a detail; never fail a call over it
        return ""
    for key in ("x509_subject", "x509_common_name"):
        values = list(auth.get(key) or ())
        if values:
            return "cert:" + values[0].decode("utf-8", "replace")[:200]
    return ""


def _record_caller(caller: str) -> None:
    """For the RPC's log line: "token:<name>", "cert:<subject>", both, or nothing."""
    from services.runtime.stage import current_rpc  # here: the probe imports this module and must start fast

    record = current_rpc.get()
    if record is not None and caller:
        record.caller = caller


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks bearer tokens and roles, and records who called.

    It sits inside the stage interceptor, so a refused call is logged with its
    real code. Health stays open unless MLMESH_HEALTH_AUTH=token, so that
    orchestrators' probes need no secret; reflection follows MLMESH_REFLECTION.
    """

    def __init__(self, settings: Settings, tokens: Sequence[Token]):
        self.tokens = tuple(tokens)
        self.health_open = settings.health_auth == "open"
        self.reflection_open = settings.reflection == "open"

    def _needs(self, method: str) -> str | None:
        """The role `method` needs, "" for any valid token, None when it is open."""
        if not self.tokens:
            return None
        if method.startswith(HEALTH_PREFIX):
            return None if self.health_open else ""
        if method.startswith(REFLECTION_PREFIX):
            return None if self.reflection_open else ""
        return required_role(method)

    def identify(self, presented: str) -> Token | None:
        """The token whose secret was presented. Every stored digest is compared, in constant
        time each, so the answer's timing says nothing about how close a guess was."""
        digest = _digest(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    async def _check(self, method: str, role: str | None, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        caller = certificate_identity(context)
        _record_caller(caller)
        if role is None:
            return
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                presented = value if isinstance(value, str) else value.decode("utf-8", "replace")
                break
        scheme, _, secret = presented.strip().partition(" ")
        if not presented:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this mesh requires a bearer token: send metadata 'authorization: Bearer <token>' "
                "(the CLI and workflow read it from MLMESH_AUTH_TOKEN or MLMESH_AUTH_TOKEN_FILE)",
            )
        token = self.identify(secret.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the bearer token is not valid for this mesh; ask its operator for one "
                "(metadata 'authorization: Bearer <token>')",
            )
        _record_caller(f"token:{token.name}" + (f",{caller}" if caller else ""))
        if role and not token.allows(role):
            short = method.rsplit("/", 1)[-1]
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {token.name!r} may not call {short}: it needs the role {role!r} "
                f"(it has {', '.join(sorted(token.roles))})",
            )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        role = self._needs(method)
        check = self._check

        def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(method, role, context)
                return await behavior(request, context)

            return wrapped

        def streaming(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                await check(method, role, context)
                async for response in behavior(request, context):
                    yield response

            return wrapped

        # Health's Watch and reflection are streams; the stages' own methods unary or server-streaming.
        return wrap_behaviour(handler, unary, streaming)


def server_interceptor(settings: Settings) -> AuthInterceptor | None:
    """The auth interceptor a stage needs: None when neither tokens nor mTLS are configured."""
    tokens = load_tokens(settings.auth_tokens_file) if settings.auth_tokens_file else []
    if not tokens and not settings.tls_client_ca:
        return None
    if tokens and not settings.tls_cert:
        log.warning("bearer tokens are required but TLS is off: tokens cross the network in clear text")
    return AuthInterceptor(settings, tokens)


# ---- clients ------------------------------------------------------------------------------
def call_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    """Metadata every client call carries for identity: the bearer token, when one is set."""
    return ((AUTHORIZATION, f"Bearer {settings.auth_token}"),) if settings.auth_token else ()


def _channel_credentials(settings: Settings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca) if settings.tls_ca else None,  # None: the system's roots
        private_key=_read(settings.tls_client_key) if settings.tls_client_key else None,
        certificate_chain=_read(settings.tls_client_cert) if settings.tls_client_cert else None,
    )


def _tls_options(settings: Settings, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    extra = [("grpc.ssl_target_name_override", settings.tls_server_name)] if settings.tls_server_name else []
    return [*options, *extra]


def open_channel(address: str, settings: Settings, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to a stage: TLS when MLMESH_TLS_CA (or a server certificate) is set."""
    if not settings.client_tls:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, _channel_credentials(settings), options=_tls_options(settings, options))


def open_sync_channel(address: str, settings: Settings, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """The blocking twin of `open_channel`, for the health probe."""
    if not settings.client_tls:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, _channel_credentials(settings), options=_tls_options(settings, options))
