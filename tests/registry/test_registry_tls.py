"""The registry over etcd with TLS and client certificates: a CA the test makes with openssl,
a real etcd that requires a client certificate signed by it, and the CA, certificate and key
passed through the URL to tooz/etcd3gw (`ca_cert`, `cert_cert`, `cert_key`)."""

import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.registry.conftest import etcd_argv, free_port
from vmthunder.registry import Registry, RegistryError

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None or shutil.which("openssl") is None, reason="needs the etcd and openssl binaries"
)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d, name):
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=d,
    )


def _make_cert(d, ca, name, ext):
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=d,
    )
    os.chmod(os.path.join(d, f"{name}.key"), 0o600)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("etcd-tls"))
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    # clientAuth too: etcd's HTTP gateway dials its own gRPC server with this certificate
    _make_cert(d, "ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    _make_cert(d, "ca", "cn1", "extendedKeyUsage=clientAuth\n")
    _make_cert(d, "other-ca", "stranger", "extendedKeyUsage=clientAuth\n")
    port, peer = free_port(), free_port()
    url, peer_url = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    p = lambda n: os.path.join(d, n)  # noqa: E731
    log = open(p("etcd.log"), "wb")
    proc = subprocess.Popen(
        etcd_argv(
            p("data"),
            url,
            peer_url,
            "--cert-file",
            p("server.pem"),
            "--key-file",
            p("server.key"),
            "--trusted-ca-file",
            p("ca.pem"),
            "--client-cert-auth",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    ctx = ssl.create_default_context(cafile=p("ca.pem"))
    ctx.load_cert_chain(p("cn1.pem"), p("cn1.key"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1, context=ctx) as r:
                    if b'"true"' in r.read():
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"etcd with TLS did not become healthy at {url} (log: {p('etcd.log')})")
            time.sleep(0.1)
        yield {"port": port, "dir": d}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # by PID
            proc.wait(timeout=10)
        log.close()


def _url(etcd, ca="ca", cert="cn1"):
    q = {"ca_cert": os.path.join(etcd["dir"], f"{ca}.pem")}
    if cert:
        q.update(cert_cert=os.path.join(etcd["dir"], f"{cert}.pem"), cert_key=os.path.join(etcd["dir"], f"{cert}.key"))
    return f"etcd3+https://127.0.0.1:{etcd['port']}?{urllib.parse.urlencode(q)}"


def test_a_registry_with_the_ca_and_a_client_certificate_works(tls_etcd, monkeypatch):
    # The URL's CA verifies etcd, not a bundle the environment names.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", os.path.join(tls_etcd["dir"], "other-ca.pem"))
    with (
        Registry(_url(tls_etcd), "cn1", lease_s=5, timeout_s=5) as a,
        Registry(_url(tls_etcd), "cn2", lease_s=5, timeout_s=5) as b,
    ):
        a.publish("img", {"state": "ready", "depth": 1, "parents": ["origin"]})
        assert [r["host"] for r in b.peers("img")] == ["cn1"]
        with b.lock("img", timeout_s=5):
            pass


@pytest.mark.parametrize(
    "ca, cert, why",
    [
        ("ca", None, "no client certificate"),
        ("ca", "stranger", "a certificate of another CA"),
        ("other-ca", "cn1", "a CA that did not sign the server"),
    ],
)
def test_a_registry_without_the_right_certificates_is_refused(tls_etcd, ca, cert, why):
    r = Registry(_url(tls_etcd, ca, cert), "cn1", lease_s=5, timeout_s=3)
    with pytest.raises(RegistryError):
        r.start()
        r.publish("img", {"state": "ready", "depth": 1, "parents": ["origin"]})  # in case start() is lazy
    r.stop()
