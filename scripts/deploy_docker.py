"""The Dockerfile parses (BuildKit's own parser, PyPI `dockerfile`) and has the
expected shape: rust:1-bookworm builder, non-root numeric USER, /valet exec-form
entrypoint, a locked release build, no EXPOSE; .dockerignore leaves out target/,
.tools/ and .git/."""

import os
import re

import dockerfile

from deploy_common import fail


def check(REPO):
    df_path = os.path.join(REPO, "Dockerfile")
    try:
        cmds = dockerfile.parse_file(df_path)
    except (OSError, dockerfile.GoParseError) as e:
        fail("Dockerfile", f"does not parse: {e}")
        cmds = []
    if cmds:
        froms = [c for c in cmds if c.cmd == "FROM"]
        if len(froms) < 2:
            fail("Dockerfile", "expected a multi-stage build (builder + runtime)")
        elif not froms[0].value[0].startswith("rust:") or "bookworm" not in froms[0].value[0]:
            fail(
                "Dockerfile",
                f"builder image {froms[0].value[0]}: expected rust:1-bookworm (same glibc as the runtime)",
            )
        last = cmds[cmds.index(froms[-1]) :] if froms else cmds
        users = [c for c in last if c.cmd == "USER"]
        if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1].value[0]):
            fail(
                "Dockerfile",
                "the runtime stage needs a numeric non-root USER (runAsNonRoot can only verify a uid)",
            )
        ep = [c for c in last if c.cmd == "ENTRYPOINT"]
        if not ep or not ep[-1].json or ep[-1].value[0] != "/valet":
            fail("Dockerfile", 'ENTRYPOINT must be ["/valet"] (exec form, so Valet gets SIGTERM)')
        if not any(
            c.cmd == "RUN" and "--locked" in c.value[0] and "--release" in c.value[0] for c in cmds
        ):
            fail("Dockerfile", "no `cargo build --release --locked` step")
        if any(c.cmd == "EXPOSE" for c in cmds):
            fail("Dockerfile", "EXPOSE: Valet is a localhost sidecar; document ports instead")
    if not os.path.exists(os.path.join(REPO, ".dockerignore")):
        fail(".dockerignore", "missing")
    else:
        with open(os.path.join(REPO, ".dockerignore"), encoding="utf-8") as fh:
            ignored = {l.strip().rstrip("/") for l in fh if l.strip() and not l.startswith("#")}
        for must in ("target", ".tools", ".git"):
            if must not in ignored:
                fail(".dockerignore", f"does not leave out {must}/")
