#!/usr/bin/env python3
"""Writes the PEM that OpenSSL's pkcs11-provider reads as a reference to a key on a token.

    pkcs11-uri-pem.py 'pkcs11:token=bench;object=bench-ecdsa;type=private' > key-uri.pem

The PEM holds no key material, only the URI: DER SEQUENCE { VisibleString description,
UTF8String uri } under the label "PKCS#11 PROVIDER URI" (the provider's own format, as its
tools/uri2pem.py writes it, without that tool's asn1crypto dependency).
"""
import base64
import sys


def der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].startswith("pkcs11:"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    uri = sys.argv[1]
    body = der(0x1A, b"PKCS#11 Provider URI v1.0") + der(0x0C, uri.encode("utf-8"))
    b64 = base64.b64encode(der(0x30, body)).decode("ascii")
    print("-----BEGIN PKCS#11 PROVIDER URI-----")
    for i in range(0, len(b64), 64):
        print(b64[i : i + 64])
    print("-----END PKCS#11 PROVIDER URI-----")
    return 0


if __name__ == "__main__":
    sys.exit(main())
