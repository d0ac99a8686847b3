"""EtcdCredentials and the --etcd-* flags: halves refused, the password from a file only, never shown."""

from __future__ import annotations

import pytest

from moemesh.cli import flags
from moemesh.cli.main import build_parser
from moemesh.control.etcd_credentials import EtcdCredentials, read_password_file
from moemesh.wire.tls import SecurityConfigError


def test_no_flag_is_no_credentials():
    assert EtcdCredentials.from_flags() is None
    assert flags.etcd_credentials(build_parser().parse_args(["router", "--etcd", "127.0.0.1:2379"])) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(cert="c.pem"), "--etcd-cert and --etcd-key go together"),
    (dict(key="k.pem"), "--etcd-cert and --etcd-key go together"),
    (dict(user="root"), "--etcd-user and --etcd-password-file go together"),
])
def test_half_a_pair_is_refused(kwargs, message):
    with pytest.raises(SecurityConfigError, match=message):
        EtcdCredentials.from_flags(**kwargs)


def test_password_file_needs_a_user_and_unreadable_files_name_the_flag(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    with pytest.raises(SecurityConfigError, match="--etcd-user and --etcd-password-file"):
        EtcdCredentials.from_flags(password_file=str(tmp_path / "pw"))
    with pytest.raises(SecurityConfigError, match=r"--etcd-password-file.*missing"):
        EtcdCredentials.from_flags(user="root", password_file=str(tmp_path / "missing"))
    with pytest.raises(SecurityConfigError, match=r"etcd CA \(--etcd-ca\)"):
        EtcdCredentials.from_flags(ca=str(tmp_path / "no-ca.pem"))


def test_the_password_is_one_line_and_never_shown(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    creds = EtcdCredentials.from_flags(user="root", password_file=str(tmp_path / "pw"))
    assert creds.password == "s3cret" and not creds.tls and creds.scheme == "http"
    assert "s3cret" not in repr(creds) and "s3cret" not in creds.describe()
    assert creds.to_args() == ["--etcd-user", "root", "--etcd-password-file", str(tmp_path / "pw")]
    (tmp_path / "two").write_text("a\nb\n")
    with pytest.raises(SecurityConfigError, match="one line") as exc:
        read_password_file(tmp_path / "two")
    assert "a\nb" not in str(exc.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecurityConfigError, match="empty"):
        read_password_file(tmp_path / "empty")


@pytest.mark.parametrize("command", [["router"], ["attn-node", "--model", "m"], ["expert-node", "--model", "m"]])
def test_every_command_with_etcd_takes_the_etcd_flags(command, tmp_path):
    (tmp_path / "pw").write_text("pw\n")
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("not empty\n")
    args = build_parser().parse_args([*command, "--etcd", "127.0.0.1:2379", "--etcd-ca", str(tmp_path / "ca.pem"),
                                      "--etcd-cert", str(tmp_path / "c.pem"), "--etcd-key", str(tmp_path / "k.pem"),
                                      "--etcd-user", "mesh", "--etcd-password-file", str(tmp_path / "pw")])
    creds = flags.etcd_credentials(args)
    assert creds.tls and creds.user == "mesh" and creds.password == "pw"
    assert creds.to_args()[:2] == ["--etcd-ca", str(tmp_path / "ca.pem")]
    assert not hasattr(args, "etcd_password")  # no flag takes a password itself
