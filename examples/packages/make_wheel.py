"""Make examples/packages/keg_greeting-1.0-py3-none-any.whl from src/ (a pure-Python wheel, reproducibly).

    python3 examples/packages/make_wheel.py
"""

import base64
import hashlib
import os
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
NAME, VERSION = "keg_greeting", "1.0"


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def main() -> str:
    info = f"{NAME}-{VERSION}.dist-info"
    with open(os.path.join(HERE, "src", NAME, "__init__.py"), "rb") as f:
        files = {f"{NAME}/__init__.py": f.read()}
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: keg-greeting\nVersion: {VERSION}\n"
                                 "Summary: greetings for the Keg examples\n").encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: keg-examples\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{n},{_digest(d)},{len(d)}\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    path = os.path.join(HERE, f"{NAME}-{VERSION}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in [*files.items(), (f"{info}/RECORD", record.encode())]:
            entry = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(entry, data)
    return path


if __name__ == "__main__":
    print(main())
