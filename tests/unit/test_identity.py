"""The authorization table and the identities behind it: exact decisions, token comparison, certificate roles."""

from __future__ import annotations

import hmac
import stat

import pytest

from moemesh.cli.certs import make_certs
from moemesh.wire import identity as ident
from moemesh.wire.authz import NO_URI, Authenticator
from moemesh.wire.identity import Decision, Identity, TokenBook, decide
from moemesh.wire.tls import SecurityConfigError


def who(role: str) -> Identity:
    return Identity(role, role, "mtls", "default")


ANON = ("UNAUTHENTICATED", "moemesh.v1.{s} needs credentials; no credentials: present a moemesh certificate (mTLS) "
        "or send metadata 'authorization: Bearer <token>'")


@pytest.mark.parametrize("method, role, expected", [
    ("/grpc.health.v1.Health/Check", None, Decision(True, "OK")),
    ("/grpc.health.v1.Health/Watch", "expert", Decision(True, "OK")),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, Decision(
        False, "UNAUTHENTICATED", "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo needs credentials; "
        "no credentials: present a moemesh certificate (mTLS) or send metadata 'authorization: Bearer <token>'")),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "expert", Decision(True, "OK")),
    ("/moemesh.v1.Inference/Generate", None, Decision(False, ANON[0], ANON[1].format(s="Inference/Generate"))),
    ("/moemesh.v1.Inference/Generate", "client", Decision(True, "OK")),
    ("/moemesh.v1.Inference/ClusterStatus", "operator", Decision(True, "OK")),
    ("/moemesh.v1.Inference/Generate", "attn", Decision(
        False, "PERMISSION_DENIED", "attn credentials may not call moemesh.v1.Inference/Generate; client, operator may")),
    ("/moemesh.v1.AttentionNode/Generate", "router", Decision(True, "OK")),
    ("/moemesh.v1.AttentionNode/Load", "client", Decision(
        False, "PERMISSION_DENIED", "client credentials may not call moemesh.v1.AttentionNode/Load; router may")),
    ("/moemesh.v1.ExpertDispatch/Dispatch", "attn", Decision(True, "OK")),
    ("/moemesh.v1.ExpertDispatch/Dispatch", "router", Decision(
        False, "PERMISSION_DENIED", "router credentials may not call moemesh.v1.ExpertDispatch/Dispatch; attn may")),
    ("/moemesh.v1.ExpertDispatch/Info", "router", Decision(True, "OK")),
    ("/moemesh.v1.ExpertDispatch/Info", "expert", Decision(
        False, "PERMISSION_DENIED", "expert credentials may not call moemesh.v1.ExpertDispatch/Info; attn, router may")),
    ("/moemesh.v1.TorchTransport/Session", "attn", Decision(True, "OK")),
    ("/moemesh.v1.TorchTransport/Session", "operator", Decision(
        False, "PERMISSION_DENIED", "operator credentials may not call moemesh.v1.TorchTransport/Session; attn may")),
    ("/moemesh.v1.MeshControl/AddExpertNodes", "operator", Decision(True, "OK")),
    ("/moemesh.v1.MeshControl/AddExpertNodes", "router", Decision(
        False, "PERMISSION_DENIED",
        "router credentials may not call moemesh.v1.MeshControl/AddExpertNodes; operator may")),
    ("/moemesh.v1.MeshControl/RemoveExpertNode", None, Decision(
        False, ANON[0], ANON[1].format(s="MeshControl/RemoveExpertNode"))),
    ("/some.other.Service/Call", "operator", Decision(
        False, "PERMISSION_DENIED", "operator credentials may not call some.other.Service/Call; no role may")),
])
def test_decide(method, role, expected):
    assert decide(method, None if role is None else who(role)) == expected


def test_decide_says_why_a_presented_credential_did_not_count():
    assert decide("/moemesh.v1.Inference/Tokenize", None, "wrong bearer token") == Decision(
        False, "UNAUTHENTICATED", "moemesh.v1.Inference/Tokenize needs credentials; wrong bearer token")


def test_every_role_is_served_somewhere_and_only_operators_control_the_mesh():
    served = {role for (_, _), roles in ident.POLICY.items() for role in roles}
    assert served == set(ident.ROLES) - {"expert"}  # expert nodes only answer; they dial nobody
    assert ident.allowed_roles(ident.CONTROL, "ListProcesses") == {"operator"}


@pytest.mark.parametrize("uri, expected", [
    ("spiffe://moemesh/prod/attn/attn-0", Identity("attn", "attn-0", "mtls", "prod")),
    ("spiffe://moemesh/prod/admin/x", None),  # not a role
    ("spiffe://moemesh/prod/attn", None),
    ("spiffe://moemesh/prod/attn/a/b", None),
    ("spiffe://other/prod/attn/a", None),
    ("https://moemesh/prod/attn/a", None),
])
def test_identity_from_uri(uri, expected):
    assert ident.identity_from_uri(uri) == expected


def test_spiffe_uri_refuses_slashes_and_spaces():
    assert ident.spiffe_uri("c", "router", "r1") == "spiffe://moemesh/c/router/r1"
    with pytest.raises(SecurityConfigError, match="name 'a/b'"):
        ident.spiffe_uri("c", "router", "a/b")


def test_certificates_carry_their_role(tmp_path):
    make_certs(tmp_path, cluster="lab", days=1)
    for role in ident.ROLES:
        assert ident.identity_from_cert((tmp_path / f"{role}.pem").read_bytes()) == Identity(role, role, "mtls", "lab")
    for other in ("control", "etcd"):  # a server certificate, etcd's: no role on the mesh's gRPC ports
        assert ident.identity_from_cert((tmp_path / f"{other}.pem").read_bytes()) is None
    assert ident.identity_from_cert((tmp_path / "ca.pem").read_bytes()) is None
    assert ident.identity_from_cert(b"not a certificate") is None
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "attn.key").stat().st_mode) == 0o600
    with pytest.raises(SecurityConfigError, match="already holds a CA"):
        make_certs(tmp_path)


def test_token_book_compares_every_role_in_constant_time(monkeypatch):
    book = TokenBook({"client": "c-token", "operator": "o-token", "router": "r-token"})
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(ident.hmac, "compare_digest", lambda a, b: compared.append(len(a)) or real(a, b))
    assert book.lookup("o-token") == "operator"
    assert compared == [32, 32, 32]  # every role, equal-length digests: no early exit, no length leak
    assert book.lookup(b"c-token") == "client"
    assert [book.lookup(t) for t in ("", "c-toke", "c-token ", "C-TOKEN", "o-tokenX")] == [None] * 5
    assert "token" not in repr(book).replace("TokenBook", "") and "c-token" not in repr(book)
    assert book.with_tokens("client", "new").lookup("c-token") is None
    assert book.with_tokens("client", ("new", "other")).lookup("other") == "client"
    assert TokenBook({"client": ("a", "b")}).lookup("b") == "client"


def test_token_book_refuses_unknown_roles_and_blank_tokens():
    with pytest.raises(SecurityConfigError, match="unknown role 'admin'"):
        TokenBook({"admin": "x"})
    with pytest.raises(SecurityConfigError, match="one word"):
        TokenBook({"client": "two words"})


def test_tokens_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# mesh tokens\nclient abc\n\nrouter  def  # the router's\n")
    assert ident.read_role_tokens(f) == {"client": "abc", "router": "def"}
    f.write_text("client abc\nboss s3cret-value\n")
    with pytest.raises(SecurityConfigError) as exc:
        ident.read_role_tokens(f)
    assert "line 2" in str(exc.value) and "s3cret-value" not in str(exc.value)  # never the token in a message
    f.write_text("client a\nclient b\n")
    with pytest.raises(SecurityConfigError, match="a second client token"):
        ident.read_role_tokens(f)


@pytest.mark.parametrize("metadata, expected", [
    (None, None), ((), None), ((("x", "y"),), None),
    ((("authorization", "Bearer abc"),), "abc"),
    ((("authorization", "bearer abc"),), "abc"),
    ((("authorization", b"Bearer abc"),), "abc"),
    ((("authorization", "abc"),), ""),  # not a bearer: presented, but wrong
    ((("authorization", "Basic abc"),), ""),
])
def test_bearer_of(metadata, expected):
    assert ident.bearer_of(metadata) == expected


def test_authenticator_identities(tmp_path):
    make_certs(tmp_path, days=1, leaves=("attn", "client"))
    attn, client = ((tmp_path / f"{r}.pem").read_bytes() for r in ("attn", "client"))
    tokens = Authenticator(tokens=TokenBook({"operator": "op"}))
    assert tokens.identify({}, (("authorization", "Bearer op"),)) == (Identity("operator", "token", "token"), None)
    assert tokens.identify({}, (("authorization", "Bearer no"),)) == (None, "wrong bearer token")
    assert tokens.identify({"x509_pem_cert": [attn]}, ()) == (None, None)  # no CA: certificates prove nothing
    mtls = Authenticator(mtls=True)
    assert mtls.identify({"x509_pem_cert": [attn]}, ()) == (Identity("attn", "attn", "mtls", "default"), None)
    assert mtls.identify({"x509_pem_cert": [b"junk"]}, ()) == (None, NO_URI)
    assert mtls.identify({}, (("authorization", "Bearer op"),)) == (None, None)  # no tokens here: ignored
    both = Authenticator(mtls=True, tokens=TokenBook({"client": "c"}))
    assert both.identify({"x509_pem_cert": [client]}, ()) == (
        None, "the client role must send its bearer token ('authorization: Bearer <token>')")
    assert both.identify({"x509_pem_cert": [client]}, (("authorization", "Bearer c"),))[0].role == "client"
    assert both.identify({"x509_pem_cert": [attn]}, ())[0].role == "attn"
    assert not Authenticator().secured and mtls.secured and tokens.secured
