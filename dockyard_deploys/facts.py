"""Custom pyinfra facts for Docker storage: what the kernel can mount, what the data root sits on,
what the engine runs now, what daemon.json holds and what a backing device already contains.
Each fact is small, shows sample output in its docstring and is tested from recorded output."""

from __future__ import annotations

import json
import shlex
from typing import Optional, TypedDict

from pyinfra.api import FactBase


class KernelFilesystems(FactBase[list]):
    """
    Filesystems the running kernel supports, from ``/proc/filesystems``.

    .. code:: python

        # nodev\toverlay
        # \text4
        ["overlay", "ext4", "btrfs", "xfs"]
    """

    def command(self) -> str:
        return "cat /proc/filesystems"

    @staticmethod
    def default() -> list:
        return []

    def process(self, output) -> list:
        return [line.split()[-1] for line in output if line.strip()]


class PathFilesystemDict(TypedDict):
    path: str
    fstype: str
    source: str
    target: str
    xfs_ftype: Optional[bool]


class PathFilesystem(FactBase[Optional[PathFilesystemDict]]):
    """
    The filesystem holding ``path`` (or its nearest existing parent), and for xfs whether it was
    made with ``ftype=1`` (d_type support, which overlay2 needs).

    .. code:: python

        # /var/lib/docker
        # ext4 /dev/vda /
        # ftype=
        {"path": "/var/lib/docker", "fstype": "ext4", "source": "/dev/vda", "target": "/",
         "xfs_ftype": None}
    """

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return (
            f'p={p}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; echo {p}; '
            'findmnt -n -o FSTYPE,SOURCE,TARGET --target "$p" | head -n 1; '
            'if [ "$(findmnt -n -o FSTYPE --target "$p" | head -n 1)" = xfs ]; then '
            'echo "ftype=$(xfs_info "$(findmnt -n -o TARGET --target "$p" | head -n 1)" '
            "2>/dev/null | grep -o 'ftype=[01]' | cut -d= -f2)\"; else echo ftype=; fi"
        )

    def requires_command(self, path: str) -> str:
        return "findmnt"

    def process(self, output) -> Optional[PathFilesystemDict]:
        lines = [line.strip() for line in output if line.strip()]
        if len(lines) < 3:
            return None
        fstype, source, target = (lines[1].split() + ["", "", ""])[:3]
        ftype = lines[2].split("=", 1)[1]
        return {
            "path": lines[0],
            "fstype": fstype,
            "source": source,
            "target": target,
            "xfs_ftype": None if ftype == "" else ftype == "1",
        }


class DockerEngineDict(TypedDict):
    version: str
    major: int
    running: bool
    driver: Optional[str]
    root_dir: Optional[str]
    images: Optional[int]
    containers: Optional[int]


class DockerEngine(FactBase[Optional[DockerEngineDict]]):
    """
    The installed engine's version (from ``dockerd --version``, no daemon needed) and, when it
    runs, its storage driver, data root and how many images and containers it holds.

    .. code:: python

        # running|20.10.24+dfsg1|overlay2|/var/lib/docker|3|1
        {"version": "20.10.24", "major": 20, "running": True, "driver": "overlay2",
         "root_dir": "/var/lib/docker", "images": 3, "containers": 1}
    """

    def requires_command(self) -> str:
        return "dockerd"

    def command(self) -> str:
        # One Go binary when the engine runs (`docker info` has the server's version): each
        # start of one costs seconds on an emulated VM. `dockerd --version` only when it is down.
        return (
            "docker info --format 'running|{{.ServerVersion}}|{{.Driver}}|{{.DockerRootDir}}|"
            "{{.Images}}|{{.Containers}}' 2>/dev/null || dockerd --version"
        )

    def process(self, output) -> Optional[DockerEngineDict]:
        lines = [line.strip() for line in output if line.strip()]
        for line in lines:  # "running|20.10.24+dfsg1|overlay2|/var/lib/docker|3|1"
            fields = line.split("|")
            # `docker info` prints the template with empty server fields (and fails) when the
            # daemon does not answer, e.g. while it restarts: then dockerd --version speaks.
            if (
                len(fields) == 6
                and fields[0] == "running"
                and all(fields[1:4])
                and fields[4].isdigit()
                and fields[5].isdigit()
            ):
                _, server, driver, root_dir, images, containers = fields
                lines = [f"Docker version {server}", f"{driver}|{root_dir}|{images}|{containers}"]
                break
        else:
            lines = [line for line in lines if not line.startswith("running|")]
        if not lines or not lines[0].startswith("Docker version ") or len(lines[0].split()) < 3:
            return None
        version = lines[0].split()[2].rstrip(",")
        number = version.split("+")[0].split("-")[0]
        try:
            major = int(number.split(".")[0])
        except ValueError:
            major = 0
        info = lines[1].split("|") if len(lines) > 1 and lines[1].count("|") == 3 else None
        if info is None:
            return {
                "version": number,
                "major": major,
                "running": False,
                "driver": None,
                "root_dir": None,
                "images": None,
                "containers": None,
            }
        return {
            "version": number,
            "major": major,
            "running": True,
            "driver": info[0],
            "root_dir": info[1],
            "images": int(info[2]),
            "containers": int(info[3]),
        }


class JsonFileDict(TypedDict):
    exists: bool
    content: Optional[dict]
    error: Optional[str]


class JsonFile(FactBase[JsonFileDict]):
    """
    A JSON file parsed (``/etc/docker/daemon.json``): missing, parsed, or the parse error.

    .. code:: python

        # {"storage-driver": "overlay2", "log-driver": "journald"}
        {"exists": True, "content": {"storage-driver": "overlay2", "log-driver": "journald"},
         "error": None}
    """

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f"if [ -f {p} ]; then echo __exists__; cat {p}; fi"

    @staticmethod
    def default() -> JsonFileDict:
        return {"exists": False, "content": None, "error": None}

    def process(self, output) -> JsonFileDict:
        lines = list(output)
        if not lines or lines[0].strip() != "__exists__":
            return self.default()
        text = "\n".join(lines[1:])
        if not text.strip():
            return {"exists": True, "content": {}, "error": None}
        try:
            content = json.loads(text)
        except ValueError as exc:
            return {"exists": True, "content": None, "error": str(exc)}
        if not isinstance(content, dict):
            return {"exists": True, "content": None, "error": "top level is not a JSON object"}
        return {"exists": True, "content": content, "error": None}


class BlockDeviceDict(TypedDict):
    exists: bool
    fstype: str
    mountpoints: list


class BlockDevice(FactBase[BlockDeviceDict]):
    """
    What a block device or loop file holds: its filesystem type (``blkid -p``, empty when none)
    and where it is mounted now (a loop file counts as mounted through its loop device).

    .. code:: python

        # __exists__
        # TYPE=btrfs
        # /var/lib/docker
        {"exists": True, "fstype": "btrfs", "mountpoints": ["/var/lib/docker"]}
    """

    def command(self, device: str) -> str:
        d = shlex.quote(device)
        return (
            "command -v blkid >/dev/null || { echo 'blkid (util-linux) is missing' >&2; exit 1; }; "
            f"if [ -e {d} ]; then echo __exists__; "
            f"echo TYPE=$(blkid -p -o value -s TYPE {d} 2>/dev/null); "
            f"for src in {d} $(losetup -n -O NAME -j {d} 2>/dev/null); do "
            'findmnt -n -o TARGET --source "$src" 2>/dev/null; done; fi'
        )

    @staticmethod
    def default() -> BlockDeviceDict:
        return {"exists": False, "fstype": "", "mountpoints": []}

    def process(self, output) -> BlockDeviceDict:
        lines = [line.strip() for line in output if line.strip()]
        if not lines or lines[0] != "__exists__":
            return self.default()
        fstype = ""
        mounts: list[str] = []
        for line in lines[1:]:
            if line.startswith("TYPE="):
                fstype = line[5:]
            elif line not in mounts:
                mounts.append(line)
        return {"exists": True, "fstype": fstype, "mountpoints": mounts}


class KernelNfsDict(TypedDict):
    server: bool
    client: bool


class KernelNfs(FactBase[KernelNfsDict]):
    """
    Whether the kernel can serve NFS (the nfsd filesystem type) and mount it (nfs/nfs4): built in
    or a loadable module. An empty /proc/fs/nfsd directory alone does not count (seen on kernels
    without nfsd). Lab containers on a kernel without NFS answer no to both.

    .. code:: python

        # server=module client=yes
        {"server": True, "client": True}
    """

    def command(self) -> str:
        return (
            "s=no; c=no; grep -qw nfsd /proc/filesystems && s=yes; "
            "[ $s = no ] && modprobe -n -q nfsd 2>/dev/null && s=module; "
            "grep -qwE 'nfs|nfs4' /proc/filesystems && c=yes; "
            "[ $c = no ] && modprobe -n -q nfs 2>/dev/null && c=module; "
            'echo "server=$s client=$c"'
        )

    @staticmethod
    def default() -> KernelNfsDict:
        return {"server": False, "client": False}

    def process(self, output) -> KernelNfsDict:
        fields = dict(part.split("=", 1) for part in " ".join(output).split() if "=" in part)
        return {
            "server": fields.get("server", "no") != "no",
            "client": fields.get("client", "no") != "no",
        }


class RegistryContainerDict(TypedDict):
    running: bool
    hash: str


class RegistryContainer(FactBase[Optional[RegistryContainerDict]]):
    """
    The registry container ``dockyard-registry``: whether it runs and the configuration hash it
    was created with (its ``dockyard.hash`` label); None when there is no such container.

    .. code:: python

        # true|3f2a...
        {"running": True, "hash": "3f2a..."}
    """

    def command(self) -> str:
        return (
            "docker inspect -f '{{.State.Running}}|{{index .Config.Labels \"dockyard.hash\"}}' "
            "dockyard-registry 2>/dev/null || true"
        )

    def requires_command(self) -> str:
        return "docker"

    def process(self, output) -> Optional[RegistryContainerDict]:
        line = " ".join(output).strip()
        if "|" not in line:
            return None
        running, _, digest = line.partition("|")
        return {"running": running == "true", "hash": digest}


class DockerImagePresent(FactBase[bool]):
    """
    Whether the engine has an image (``docker image inspect``).

    .. code:: python

        # yes
        True
    """

    def command(self, image: str) -> str:
        return f"docker image inspect {shlex.quote(image)} >/dev/null 2>&1 && echo yes || echo no"

    def requires_command(self, image: str) -> str:
        return "docker"

    @staticmethod
    def default() -> bool:
        return False

    def process(self, output) -> bool:
        return " ".join(output).strip() == "yes"


class PythonInfo(TypedDict):
    version: str  # "3.11"
    machine: str  # "x86_64"


class HostPython(FactBase[Optional[PythonInfo]]):
    """
    The host's python3 version and machine architecture; None without python3.

    .. code:: python

        # 3.11 x86_64
        {"version": "3.11", "machine": "x86_64"}
    """

    def command(self) -> str:
        return (
            "python3 -c 'import sys, platform; "
            'print("%d.%d" % sys.version_info[:2], platform.machine())\''
        )

    def requires_command(self) -> str:
        return "python3"

    @staticmethod
    def default() -> Optional[PythonInfo]:
        return None

    def process(self, output: list[str]) -> Optional[PythonInfo]:
        parts = " ".join(output).split()
        return {"version": parts[0], "machine": parts[1]} if len(parts) == 2 else None


class KernelAppArmor(FactBase[bool]):
    """
    Whether this kernel enforces AppArmor as dockerd sees it: the module enabled and its
    securityfs mounted (not so inside a container, whose dockerd runs without profiles).

    .. code:: python

        # Y
        # securityfs
        True
    """

    def command(self) -> str:
        return (
            "cat /sys/module/apparmor/parameters/enabled 2>/dev/null; "
            "test -d /sys/kernel/security/apparmor && echo securityfs || true"
        )

    @staticmethod
    def default() -> bool:
        return False

    def process(self, output: list[str]) -> bool:
        lines = [line.strip() for line in output]
        return "Y" in lines and "securityfs" in lines


class FileDigests(FactBase[dict[str, str]]):
    """
    The sha256 of every regular file directly in a directory (hidden files left out), by name;
    empty when the directory does not exist. One command for a whole directory, where pyinfra's
    files.sync asks two facts per file.

    .. code:: python

        # 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  ./a.whl
        {"a.whl": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
    """

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (
            f"! test -d {quoted} || (cd {quoted} && "
            "find . -maxdepth 1 -type f ! -name '.*' -exec sha256sum {} +)"
        )

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def process(self, output: list[str]) -> dict[str, str]:
        out = {}
        for line in output:
            digest, _, name = line.strip().partition("  ")
            if len(digest) == 64 and name.startswith("./"):
                out[name[2:]] = digest
        return out


class NamedVolumeDict(TypedDict):
    name: str
    driver: str
    options: dict
    labels: dict


class DockerNamedVolumes(FactBase[dict]):
    """
    Every named volume of the engine (``docker volume inspect`` of ``docker volume ls``), by
    name: its driver, driver options and labels (``null`` in Docker's output reads as ``{}``).
    No volumes, or no engine answering, is ``{}``.

    .. code:: python

        # [{"Name": "wp_content", "Driver": "local", "Labels": {"app": "wordpress"},
        #   "Options": {"device": ":/srv/exports/wp-content", "o": "addr=10.0.0.5,nfsvers=4",
        #               "type": "nfs"}, "Scope": "local", "Mountpoint": "/var/lib/docker/..."}]
        {"wp_content": {"name": "wp_content", "driver": "local", "labels": {"app": "wordpress"},
                        "options": {"device": ":/srv/exports/wp-content",
                                    "o": "addr=10.0.0.5,nfsvers=4", "type": "nfs"}}}
    """

    def command(self) -> str:
        return "docker volume ls -q | xargs -r docker volume inspect"

    def requires_command(self) -> str:
        return "docker"

    @staticmethod
    def default() -> dict:
        return {}

    def process(self, output) -> dict[str, NamedVolumeDict]:
        text = "\n".join(output).strip()
        if not text:
            return {}
        out: dict[str, NamedVolumeDict] = {}
        for item in json.loads(text):
            out[item["Name"]] = {
                "name": item["Name"],
                "driver": item.get("Driver") or "",
                "options": dict(item.get("Options") or {}),
                "labels": dict(item.get("Labels") or {}),
            }
        return out


class DockerVolumeUsers(FactBase[list]):
    """
    The containers, running or not, that use a named volume (``docker ps -a --filter
    volume=NAME``), by name.

    .. code:: python

        # wordpress-web
        # wordpress-backup
        ["wordpress-backup", "wordpress-web"]
    """

    def command(self, volume: str) -> str:
        return f"docker ps -a --filter {shlex.quote('volume=' + volume)} --format '{{{{.Names}}}}'"

    def requires_command(self, volume: str) -> str:
        return "docker"

    @staticmethod
    def default() -> list:
        return []

    def process(self, output) -> list[str]:
        return sorted({line.strip() for line in output if line.strip()})
