"""What a compiled kernel uses, read from the compiler's own reports: ptxas' ``-v`` log (registers, stack frame,
spill stores and loads per entry function) and cuobjdump's ``--dump-resource-usage`` (REG, STACK, LOCAL, SHARED
of each ``Function`` block). A Triton kernel makes no calls, so any stack frame is spilled registers.

Pure text parsing plus the two tool paths: importable without Triton.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class PtxasUsage:
    """One entry function as ptxas ``-v`` reports it."""

    registers: int
    stack_frame_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    def spills(self) -> bool:
        return bool(self.stack_frame_bytes or self.spill_store_bytes or self.spill_load_bytes)


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for ([A-Za-z_$][\w$]*)\s*\n\s*(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(text: str) -> dict[str, PtxasUsage]:
    """Per entry function of a ``ptxas -v`` log (either ptxas' prefix): its `PtxasUsage`. Each entry's block runs
    from its "Compiling entry function" line to the next one, so one function's numbers never fill in another's."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(text)]
    for i, (pos, name) in enumerate(starts):
        block = text[pos:starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        props = [m for m in _PROPERTIES.finditer(block) if m.group(1) == name]
        used = _USED.search(block)
        if not props or not used:
            continue
        stack, stores, loads = (int(v) for v in props[0].groups()[1:])
        out[name] = PtxasUsage(int(used.group(1)), stack, stores, loads)
    return out


def parse_cuobjdump_usage(text: str) -> dict[str, dict[str, int]]:
    """Per ``Function <name>:`` block of ``cuobjdump --dump-resource-usage``: its ``REG``, ``STACK``, ``SHARED``,
    ``LOCAL`` (and any other ``KEY:value``) numbers, read from that block's own line only."""
    out = {}
    for m in re.finditer(r"Function ([^\s:]+):\s*\n([^\n]*)", text):
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r"\b([A-Z_]+)(?:\[\d+\])?:(\d+)", m.group(2))}
    return out


def nvidia_tool(name: str) -> str:
    """Path of one of the tools Triton bundles (``ptxas``, ``ptxas-blackwell``, ``cuobjdump``)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_for(arch: str) -> str:
    """The ptxas Triton itself runs for ``arch`` ("sm_80"...): its Blackwell build from sm_100 on."""
    return nvidia_tool("ptxas-blackwell" if int(arch[3:]) >= 100 else "ptxas")


def gpu_name(arch: str) -> str:
    """The ``--gpu-name`` Triton passes ptxas: the architecture-specific ``a`` variant from sm_90 on."""
    return arch + ("a" if int(arch[3:]) >= 90 else "")


def cuobjdump_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """`parse_cuobjdump_usage` of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return parse_cuobjdump_usage(text)
