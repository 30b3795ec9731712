"""A busybox image for container tests: crafted tar layers, an OCI layout of them, and its import into a keg.

Shared by the runc tests (``test_container.py``, ``test_mayor_runc.py``); nothing here starts a container.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile

from keg import oci

BUSYBOX = "/bin/busybox"
APPLETS = [
    "sh", "echo", "cat", "id", "sleep", "unshare", "mount", "ls", "head", "tr", "touch", "grep", "true",
    "rm", "mkdir", "httpd", "seq", "kill", "test", "yes",
]  # fmt: skip
PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\n"
    b"app:x:1234:2345:app:/home/app:/bin/sh\n"
    b"nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
)
GROUP = b"root:x:0:\napp:x:2345:\nstaff:x:50:app\nnogroup:x:65534:\n"


def why_no_containers():
    """Why containers cannot run here (a reason to fail the test with), or None."""
    if os.geteuid() != 0:
        return "needs root to mount overlayfs and run runc"
    if shutil.which("runc") is None:
        return "runc is not installed (apt-get install runc)"
    if not os.path.exists(BUSYBOX):
        return "busybox-static is not installed (apt-get install busybox-static)"
    return None


# ---------------------------------------------------------------------------
# tar layers


def tar_entry(name, kind="file", data=b"", mode=None, uid=0, gid=0, target="", mtime=1_600_000_000, dev=(0, 0)):
    """One crafted tar member: (TarInfo, data or None)."""
    info = tarfile.TarInfo(name)
    info.uid, info.gid, info.mtime = uid, gid, mtime
    types = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    info.type = types[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.linkname = target
    info.devmajor, info.devminor = dev
    if kind == "file":
        info.size = len(data)
        return info, data
    return info, None


def make_tar(entries) -> bytes:
    """An uncompressed tarball of ``(TarInfo, data)`` entries, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def busybox_layer(extra=()) -> bytes:
    """A root filesystem: bin/busybox, applet symlinks, /etc/passwd and /etc/group, then ``extra`` entries."""
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    entries = [tar_entry(d, "dir") for d in ("bin", "etc", "mnt", "home", "home/app")]
    entries.append(tar_entry("tmp", "dir", mode=0o1777))
    entries.append(tar_entry("bin/busybox", data=busybox, mode=0o755))
    entries += [tar_entry(f"bin/{a}", "symlink", target="busybox") for a in APPLETS]
    entries.append(tar_entry("etc/passwd", data=PASSWD))
    entries.append(tar_entry("etc/group", data=GROUP))
    entries += list(extra)
    return make_tar(entries)


def digest_of(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def snapshot(top: str) -> set:
    """Every path under ``top``, to show nothing appeared outside a layer."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), top))
    return found


# ---------------------------------------------------------------------------
# images in a keg


def write_oci_layout(layout: str, layer_blobs, image_config=None, tag: str = "latest") -> str:
    """Write an OCI image layout of uncompressed tar layers (base first); returns the manifest digest."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def add(data: bytes) -> dict:
        digest = digest_of(data)
        with open(os.path.join(blobs, digest.split(":")[1]), "wb") as f:
            f.write(data)
        return {"digest": digest, "size": len(data)}

    layer_descs = [{"mediaType": oci.OCI_LAYER, **add(b)} for b in layer_blobs]
    config = {
        "architecture": oci.machine_platform()[0],
        "os": "linux",
        "config": dict(image_config or {}),
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]},
    }
    config_desc = {"mediaType": oci.OCI_CONFIG, **add(json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": config_desc, "layers": layer_descs}
    manifest_desc = {"mediaType": oci.OCI_MANIFEST, **add(json.dumps(manifest).encode()),
                     "annotations": {oci.REF_NAME: tag}}
    with open(os.path.join(layout, "oci-layout"), "wb") as f:
        f.write(oci.LAYOUT_BYTES)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [manifest_desc]}, f)
    return manifest_desc["digest"]


def import_image(store, reference: str, layer_blobs, image_config=None) -> str:
    """Import an image made of ``layer_blobs`` into ``store`` as ``reference``; returns its KID."""
    with tempfile.TemporaryDirectory(prefix="keg-test-layout-") as layout:
        write_oci_layout(layout, layer_blobs, image_config)
        return oci.import_image(store, layout, reference, kind="oci").kid


def import_busybox(store, reference: str = "test/busybox:1", extra=(), image_config=None) -> str:
    """Import the busybox image (plus ``extra`` tar entries) into ``store``; returns its KID."""
    return import_image(store, reference, [busybox_layer(extra)], image_config)


# ---------------------------------------------------------------------------
# cleaning up


def remove_cgroup_parent(name: str) -> None:
    """rmdir the test's cgroup parent in every hierarchy, beneath this process's own cgroups."""
    own = set()
    with open("/proc/self/cgroup") as f:
        for line in f:
            own.add(line.rstrip("\n").split(":", 2)[2])
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append(fields[4])
    for mount_point in mounts:
        for path in own | {"/"}:
            candidate = os.path.join(mount_point, path.lstrip("/"), name)
            if os.path.isdir(candidate):
                os.rmdir(candidate)
