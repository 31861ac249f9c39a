"""Throwaway x509 material for the TLS tests, made with the openssl command (EC P-256: quick to make)."""

import os
import shutil
import subprocess
from typing import Optional, Sequence, Tuple

import pytest


class Certs:
    """CAs and certificates in ``directory``; each method returns (certificate PEM, key PEM) paths."""

    def __init__(self, directory: str) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("needs the openssl command")
        self.directory = str(directory)

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.directory, check=True, capture_output=True, timeout=60)

    def _path(self, name: str) -> Tuple[str, str]:
        return os.path.join(self.directory, f"{name}.pem"), os.path.join(self.directory, f"{name}.key")

    def ca(self, name: str) -> Tuple[str, str]:
        pem, key = self._path(name)
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", key, "-out", pem, "-days", "2", "-subj", f"/CN={name}")
        return pem, key

    def cert(self, name: str, dns: Sequence[str] = (), ips: Sequence[str] = (),
             ca: Optional[Tuple[str, str]] = None) -> Tuple[str, str]:
        """A certificate for ``dns``/``ips`` (the first DNS name, else ``name``, is its CN), signed by
        ``ca`` or self-signed."""
        pem, key = self._path(name)
        san = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
        ext = os.path.join(self.directory, f"{name}.ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
        subject = f"/CN={dns[0] if dns else name}"
        if ca is None:
            self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                          "-keyout", key, "-out", pem, "-days", "2", "-subj", subject, "-addext",
                          f"subjectAltName={san}")
            return pem, key
        csr = os.path.join(self.directory, f"{name}.csr")
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", key, "-out", csr, "-subj", subject)
        self._openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                      "-out", pem, "-days", "2", "-extfile", ext)
        return pem, key


def central_tls_args(ca: Tuple[str, str], server: Tuple[str, str], permit: Sequence[str]) -> list:
    """`forward-config rsyslog` options for a TLS central accepting the certificates named ``permit``."""
    args = ["--tls", "--tls-ca", ca[0], "--tls-cert", server[0], "--tls-key", server[1]]
    for name in permit:
        args += ["--tls-permit", name]
    return args
