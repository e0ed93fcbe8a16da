"""One certificate order over ACME (RFC 8555) with the certbot project's ``acme`` library:
the HTTP-01 challenge, answered by whichever node's plain http listener the ACME server reaches
(the answers are in the store), then the finalization.

The library is synchronous (``requests``, polling with ``time.sleep``): every method here runs
on a worker thread; :mod:`relay.certs.manager` stores what it returns on the event loop in
between (:meth:`AcmeClient.begin` gives the challenges to store before
:meth:`AcmeClient.finish` asks the server to check them).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.config import AcmeSettings

USER_AGENT = "tracking-relay"
NETWORK_TIMEOUT = 30  # seconds per request to the ACME server
ORDER_SECONDS = 120  # validation and issuance of one order, at most


@dataclass(frozen=True)
class Challenge:
    token: str  # the last segment of /.well-known/acme-challenge/<token>
    key_authorization: str


@dataclass(frozen=True)
class Order:
    host: str
    key_pem: str  # the certificate's private key
    resource: messages.OrderResource
    challenges: tuple[tuple[Challenge, messages.ChallengeBody], ...]


class AcmeClient:
    """An account at ``settings.directory``: the key given (PEM) or a new one."""

    def __init__(self, settings: AcmeSettings, key_pem: str | None, uri: str | None) -> None:
        self.settings = settings
        if key_pem is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            key_pem = _pem(key)
        self.key_pem = key_pem
        self.uri = uri
        self.key = jose.JWKRSA.load(key_pem.encode())
        self._client: client.ClientV2 | None = None

    def connect(self) -> None:
        """Read the directory; register the account (or find it by its key) unless known."""
        verify: bool | str = str(self.settings.ca_bundle) if self.settings.ca_bundle else True
        net = client.ClientNetwork(self.key, verify_ssl=verify,  # type: ignore[arg-type]
                                   user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
        directory = client.ClientV2.get_directory(self.settings.directory, net)
        acme = client.ClientV2(directory, net)
        if self.uri is None:
            registration = messages.NewRegistration.from_data(
                email=self.settings.email, terms_of_service_agreed=True)
            try:
                self.uri = acme.new_account(registration).uri
            except errors.ConflictError as exc:  # the key has an account already
                self.uri = exc.location
        net.account = messages.RegistrationResource(uri=self.uri, body=messages.Registration())
        self._client = acme

    def begin(self, host: str) -> Order:
        """A new order for ``host``: its HTTP-01 challenges, not answered yet."""
        acme = self._connected()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = _pem(key)
        resource = acme.new_order(crypto_util.make_csr(key_pem.encode(), [host]))
        found = []
        for authz in resource.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # a recent validation the server reuses
            for challb in authz.body.challenges:
                if isinstance(challb.chall, challenges.HTTP01):
                    token = challb.chall.encode("token")
                    found.append((Challenge(token, challb.chall.validation(self.key)), challb))
                    break
            else:
                raise errors.Error(f"the ACME server offers no http-01 challenge for {host}")
        return Order(host, key_pem, resource, tuple(found))

    def finish(self, order: Order) -> str:
        """Answer the challenges (stored by now), wait for validation and issuance; the
        certificate chain in PEM."""
        acme = self._connected()
        for _, challb in order.challenges:
            acme.answer_challenge(challb, challb.chall.response(self.key))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_SECONDS)
        done = acme.poll_and_finalize(order.resource, deadline)
        return str(done.fullchain_pem)

    def _connected(self) -> client.ClientV2:
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._client


def describe(exc: BaseException) -> str:
    """A failed order in one line for people: the ACME server's problem when it sent one."""
    if isinstance(exc, errors.IssuanceError):
        text = str(exc.error)
    elif isinstance(exc, errors.ValidationError):
        text = "; ".join(f"{a.body.identifier.value}: {c.error}"
                         for a in exc.failed_authzrs for c in a.body.challenges if c.error)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:500]


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
