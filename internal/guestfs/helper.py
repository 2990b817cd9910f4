# ferry's libguestfs helper: one appliance over read-only NBD drives, driven
# by JSON lines on stdin, answered by JSON lines on stdout. Started and
# spoken to only by internal/guestfs (Go); see session.go for the protocol.
# It uses libguestfs's own Python bindings (Debian python3-guestfs) so that
# every call reports its error instead of ending the session.
import json
import os
import stat
import sys

import guestfs

SUPPORTED = {"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "ntfs"}


def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def kind(mode):
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def info(name, st, link=""):
    return {"name": name, "type": kind(st["st_mode"]), "size": st["st_size"],
            "mode": st["st_mode"] & 0o7777, "mtime": st["st_mtime_sec"], "link": link}


def main():
    cfg = json.loads(sys.argv[1])
    g = guestfs.GuestFS(python_return_dict=True)
    if cfg.get("force_tcg"):
        g.set_backend_setting("force_tcg", "1")
    for d in cfg["drives"]:
        g.add_drive_opts(d["export"], readonly=True, format="raw", protocol="nbd",
                         server=["unix:" + d["socket"]], name=d["name"])
    g.launch()
    # Devices in the appliance's order are the drives' order (sda, sdb...).
    devices = g.list_devices()
    fss = g.list_filesystems()
    mounted = {}
    reply(ok=True, result={"devices": devices, "filesystems": fss})
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "quit":
                reply(ok=True)
                break
            dev = req.get("device", "")
            if op != "noop":
                if dev not in fss:
                    reply(ok=False, kind="invalid", error="no file system on " + dev)
                    continue
                if fss[dev] not in SUPPORTED:
                    reply(ok=False, kind="unsupported", error="file system %s on %s cannot be read" % (fss[dev] or "unknown", dev))
                    continue
                if dev not in mounted:
                    mp = "/m%d" % len(mounted)
                    g.mkmountpoint(mp)
                    try:
                        # The drives are read-only; libguestfs puts a
                        # throw-away overlay under them, so a file system
                        # caught mid-transaction (a crash-consistent point)
                        # replays its journal there and mounts.
                        g.mount_ro(dev, mp)
                    except RuntimeError as e:
                        reply(ok=False, kind="unsupported", error="mount %s (%s): %s" % (dev, fss[dev], e))
                        continue
                    mounted[dev] = mp
                path = mounted[dev] + req.get("path", "/")
            if op == "noop":
                reply(ok=True)
                continue
            # Every path is looked at first: what kind of error a call
            # would give is decided here, on the file's type, never on
            # an error message's text.
            try:
                st = g.lstatns(path)
            except RuntimeError:
                reply(ok=False, kind="notfound", error="no such file or directory")
                continue
            t = kind(st["st_mode"])
            want = {"ls": "dir", "du": None, "stat": None, "download": "file", "tar": "dir"}.get(op, "?")
            if want == "?":
                reply(ok=False, kind="invalid", error="unknown op " + str(op))
                continue
            if want is not None and t != want:
                reply(ok=False, kind={"dir": "notdir", "file": "isdir" if t == "dir" else "notfile"}[want],
                      error="%s is a %s" % (req.get("path"), t))
                continue
            if op == "stat":
                link = g.readlink(path) if t == "symlink" else ""
                reply(ok=True, result=info(os.path.basename(req["path"]) or "/", st, link))
            elif op == "ls":
                names = g.ls(path)
                out = []
                for i in range(0, len(names), 500):
                    chunk = names[i:i + 500]
                    sts = g.lstatnslist(path, chunk)
                    links = {}
                    lnk = [n for n, s in zip(chunk, sts) if stat.S_ISLNK(s["st_mode"])]
                    if lnk:
                        links = dict(zip(lnk, g.readlinklist(path, lnk)))
                    out += [info(n, s, links.get(n, "")) for n, s in zip(chunk, sts)]
                reply(ok=True, result=out)
            elif op == "du":
                reply(ok=True, result=g.du(path) * 1024)
            elif op == "download":
                g.download(path, req["out"])
                reply(ok=True)
            elif op == "tar":
                g.tar_out(path, req["out"], numericowner=True)
                reply(ok=True)
        except Exception as e:  # noqa: BLE001 - the session goes on
            reply(ok=False, kind="io", error=str(e))
    g.shutdown()
    g.close()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # launch failed: say why, once
        reply(ok=False, kind="launch", error=str(e))
        sys.exit(1)
