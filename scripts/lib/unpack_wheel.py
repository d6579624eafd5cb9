"""Install a pure-Python wheel by unpacking it into site-packages, optionally
leaving out some subdirectories of one directory; print its requirements
(Requires-Dist, one per line, markers kept) for pip to install.

Usage: unpack_wheel.py WHEEL SITE_PACKAGES [DIR KEEP...]
  With DIR, of the entries directly under DIR only those named KEEP are unpacked.

Why not pip: for a pure-Python wheel (Root-Is-Purelib, no .data directory) an
install is an unpack into site-packages (the wheel format's spec), and pip
does it at about a millisecond per file. kubernetes-validate has ~17,000
(JSON schemas of every Kubernetes version, strict and not) of which
scripts/check-deploy.sh reads the strict ones of two versions; pip took ~15
core-seconds for it. Each member's CRC-32 is checked as it is read. The
dist-info is unpacked as is, and its INSTALLER says what was left out."""

import email.parser
import os
import sys
import zipfile


def main():
    wheel, site, *only = sys.argv[1:]
    only_dir, keep = (only[0].rstrip("/") + "/", set(only[1:])) if only else (None, set())
    with zipfile.ZipFile(wheel) as z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        dist_info = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        if len(dist_info) != 1:
            sys.exit(f"{wheel}: expected one .dist-info directory, found {sorted(dist_info)}")
        dist_info = dist_info.pop()
        meta = email.parser.BytesParser().parsebytes(z.read(f"{dist_info}/WHEEL"))
        if meta.get("Root-Is-Purelib", "").strip().lower() != "true" or any(
            n.split("/", 1)[0].endswith(".data") for n in names
        ):
            sys.exit(f"{wheel}: not a pure-Python wheel without .data: pip must install it")
        for n in names:
            if n.startswith("/") or ".." in n.split("/"):
                sys.exit(f"{wheel}: unsafe member path {n!r}")
        if only_dir is not None:
            kept = {n[len(only_dir) :].split("/", 1)[0] for n in names if n.startswith(only_dir)}
            if missing := keep - kept:
                sys.exit(f"{wheel}: no {', '.join(sorted(missing))} under {only_dir}")
            infos = [
                i
                for i in infos
                if not i.filename.startswith(only_dir)
                or i.filename[len(only_dir) :].split("/", 1)[0] in keep
            ]
        for d in sorted({os.path.dirname(i.filename) for i in infos}):
            os.makedirs(os.path.join(site, d), exist_ok=True)
        for i in infos:
            with open(os.path.join(site, i.filename), "wb") as out:
                out.write(z.read(i))
        note = "valet scripts/lib/unpack_wheel.py"
        if only_dir is not None:
            note += f" (of {only_dir} only {' '.join(sorted(keep))})"
        with open(os.path.join(site, dist_info, "INSTALLER"), "w", encoding="utf-8") as out:
            out.write(note + "\n")
        metadata = email.parser.BytesParser().parsebytes(z.read(f"{dist_info}/METADATA"))
        for req in metadata.get_all("Requires-Dist") or []:
            print(req)


if __name__ == "__main__":
    main()
