"""The innermost loops of a compiled kernel that hold tensor-core instructions, read from its SASS.

:func:`mma_loops` takes the text ``cuobjdump -sass`` prints for a cubin (one ``/*addr*/ [@P] OPCODE ...;`` line per
instruction, branch targets as addresses) and returns, per loop, its instruction count, its tensor-core
instructions (``HMMA`` on sm80, ``HGMMA`` on sm90a, ``UTC*MMA`` on sm100a), the instructions per tensor-core
instruction and the mix (``MIX``). A pure function of the text: the compile report (``compile_report.py``) calls it
on every compiled variant; tests/test_sass_loops.py runs it on handcrafted SASS.

Loops are the natural loops of the control-flow graph (a back edge is a branch to a block that dominates it), so a
branch back from an out-of-line slow path (the retry of an mbarrier wait that ptxas places after the kernel's
``EXIT`` and that jumps back into the loop) is not a loop of its own. A loop's instructions are those of its blocks
inside its address range (header to last back edge): the straight-line code each iteration runs through, without
the out-of-line retry paths. Kept: the loops that hold a tensor-core instruction and contain no other such loop
(the innermost ones; a spin-wait loop nested inside does not count).

``kind``: ``"online-softmax"`` when the loop has a ``MUFU.EX2`` and a float max (``FMNMX``: the running row max of
an attention main loop), ``"exp"`` when it has ``MUFU.EX2`` but no max (probabilities recomputed from a stored
log-sum-exp: the capture loops, the maps' backward), ``"mma"`` otherwise.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

__all__ = ["MIX", "parse_sass", "mma_loops"]

# Mix categories, in report order: name -> opcode pattern (matched against the opcode with its modifiers). sm100a has
# paired and three-way forms (FFMA2, FMUL2, FADD2: two lanes of fp32 per instruction; FMNMX3: the max of three).
MIX = (
    ("ex2", re.compile(r"MUFU\.EX2\b")),
    ("ffma", re.compile(r"FFMA2?\b")),
    ("fmul", re.compile(r"FMUL2?\b")),
    ("fadd", re.compile(r"FADD2?\b")),
    ("fmnmx", re.compile(r"FMNMX3?\b")),
    ("select", re.compile(r"U?F?SEL\b")),
    ("compare", re.compile(r"U?[IF]SETP\b")),
    ("barrier", re.compile(r"(?:BAR|SYNCS|WARPSYNC|WARPGROUP|DEPBAR|MEMBAR|FENCE|ARRIVES|UTCBAR|ERRBAR)\b")),
    ("ldst", re.compile(r"(?:LDG|STG|LDS|STS|LDSM|STSM|LDL|STL|LDGSTS|LDGDEPBAR|UTMALDG|UTMASTG|UTMAPF|UBLKCP|"
                        r"RED|ATOM|ATOMS|LDTM|STTM|UTCCP)\b")),
    ("convert", re.compile(r"(?:F2F|F2FP|I2F|F2I|I2FP|F2IP|FRND)\b")),
)
_MMA = re.compile(r"(?:HMMA|HGMMA|UTC\w*MMA)\b")
_INSTRUCTION = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(@!?U?P(?:T|\d)\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-fA-F]+)")
_OPERAND_PREDICATE = re.compile(r"!?U?P\d+\s*,")

Instruction = Tuple[int, bool, str, str]  # (address, predicated, opcode with modifiers, operands)


def parse_sass(sass: str) -> List[List[Instruction]]:
    """The instructions of each function (``Function : name`` sections) of ``cuobjdump -sass`` text, in address
    order: ``(address, predicated, opcode, operands)``. ``predicated``: a ``@P`` guard other than ``@PT`` (always
    true), or a branch's predicate operand (``BRA.U !UP0, 0x3b10``)."""
    functions: List[List[Instruction]] = []
    current: List[Instruction] = []
    for line in sass.splitlines():
        if "Function :" in line:
            current = []
            functions.append(current)
            continue
        m = _INSTRUCTION.search(line)
        if m is None:
            continue
        if not functions:
            functions.append(current)
        pred, op, args = (m.group(2) or "").strip(), m.group(3), m.group(4).strip()
        predicated = bool(pred) and pred != "@PT"
        if _is_branch(op):  # a uniform branch takes its predicate as an operand: BRA.U !UP0, 0x3b10
            predicated = predicated or bool(_OPERAND_PREDICATE.match(args))
        current.append((int(m.group(1), 16), predicated, op, args))
    return [f for f in functions if f]


def _is_branch(opcode: str) -> bool:
    """A jump to an address: ``BRA``, ``JMP``, and ``CALL.REL.NOINC`` (a call that pushes no return address: how
    ptxas leaves some loops on sm80)."""
    base = opcode.split(".")[0]
    return base in ("BRA", "JMP") or (base == "CALL" and ".NOINC" in opcode)


def _branch_target(args: str):
    """The address a branch goes to: its last hex operand (``BRA 0x3a80``, ``BRA.U !UP0, 0x3a80``), or None."""
    found = _TARGET.findall(args)
    return int(found[-1], 16) if found else None


def _blocks(code: List[Instruction]):
    """Basic blocks ``[(first index, last index)]`` and their successors (block indices)."""
    index_of = {addr: i for i, (addr, *_) in enumerate(code)}
    leaders = {0}
    for i, (_, _, op, args) in enumerate(code):
        base = op.split(".")[0]
        if _is_branch(op):
            target = _branch_target(args)
            if target in index_of:
                leaders.add(index_of[target])
        if _is_branch(op) or base in ("EXIT", "RET", "BRX", "JMX", "KILL"):
            leaders.add(i + 1)
    starts = sorted(s for s in leaders if s < len(code))
    block_of = {s: b for b, s in enumerate(starts)}
    blocks = [(s, (starts[b + 1] if b + 1 < len(starts) else len(code)) - 1) for b, s in enumerate(starts)]
    succ: List[List[int]] = []
    for b, (_, last) in enumerate(blocks):
        _, predicated, op, args = code[last]
        base = op.split(".")[0]
        out = []
        if _is_branch(op):
            target = _branch_target(args)
            if target in index_of:
                out.append(block_of[index_of[target]])
            falls = predicated
        else:
            falls = predicated or base not in ("EXIT", "RET", "BRX", "JMX", "KILL")
        if falls and b + 1 < len(blocks):
            out.append(b + 1)
        succ.append(out)
    return blocks, succ


def _dominators(n: int, succ: List[List[int]], entry: int = 0) -> List[set]:
    """Dominator sets of the blocks reachable from ``entry`` (unreachable blocks: empty set)."""
    pred: List[List[int]] = [[] for _ in range(n)]
    for b, out in enumerate(succ):
        for s in out:
            pred[s].append(b)
    reachable, stack = {entry}, [entry]
    while stack:
        for s in succ[stack.pop()]:
            if s not in reachable:
                reachable.add(s)
                stack.append(s)
    dom = [set(reachable) if b in reachable else set() for b in range(n)]
    dom[entry] = {entry}
    changed = True
    while changed:
        changed = False
        for b in sorted(reachable - {entry}):
            ps = [dom[p] for p in pred[b] if p in reachable]
            new = set.intersection(*ps) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def _natural_loops(n: int, succ: List[List[int]], indirect: bool = False) -> Dict[int, Tuple[set, int]]:
    """header block -> (the blocks of its natural loop, the last back-edge source block).

    ``indirect``: the code has an indirect branch (``BRX``: how a warp-specialised kernel dispatches its partitions
    on sm100a), whose targets are unknown: every block without a predecessor is then taken as one, entered from a
    virtual root (block ``n``)."""
    pred: List[List[int]] = [[] for _ in range(n)]
    for b, out in enumerate(succ):
        for s in out:
            pred[s].append(b)
    roots = [0] + ([b for b in range(1, n) if not pred[b]] if indirect else [])
    dom = _dominators(n + 1, succ + [roots], entry=n)
    loops: Dict[int, Tuple[set, int]] = {}
    for u in range(n):
        for h in succ[u]:
            if h not in dom[u]:
                continue
            body, stack = {h, u}, [u]
            while stack:
                x = stack.pop()
                if x == h:
                    continue
                for p in pred[x]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            old = loops.get(h)
            loops[h] = (body | old[0], max(u, old[1])) if old else (body, u)
    return loops


def mma_loops(sass: str) -> List[Dict]:
    """The innermost loops holding tensor-core instructions, in address order, as dicts:
    ``start`` / ``end`` (hex addresses of the loop's first instruction and its last back edge), ``instructions``,
    ``mma`` (tensor-core instructions), ``per_mma`` (instructions per tensor-core instruction, 1 decimal),
    ``kind`` (see the module docstring) and ``mix`` (category -> count, ``MIX`` order, plus ``other``)."""
    result = []
    for code in parse_sass(sass):
        blocks, succ = _blocks(code)
        loops = _natural_loops(len(blocks), succ, indirect=any(op.split(".")[0] == "BRX" for _, _, op, _ in code))

        def instructions(header, body, latch):
            lo, hi = blocks[header][0], blocks[latch][1]
            return [code[i] for b in sorted(body) for i in range(blocks[b][0], blocks[b][1] + 1) if lo <= i <= hi]

        with_mma = {h: (body, latch) for h, (body, latch) in loops.items()
                    if any(_MMA.match(op) for _, _, op, _ in instructions(h, body, latch))}
        for h, (body, latch) in sorted(with_mma.items()):
            if any(other != h and other in body for other in with_mma):
                continue  # not innermost: another loop with tensor-core instructions inside
            ops = [op for _, _, op, _ in instructions(h, body, latch)]
            mix = {name: 0 for name, _ in MIX}
            mix["other"] = 0
            mma = 0
            for op in ops:
                if _MMA.match(op):
                    mma += 1
                    continue
                name = next((name for name, pattern in MIX if pattern.match(op)), "other")
                mix[name] += 1
            kind = "exp" if mix["ex2"] else "mma"
            if mix["ex2"] and mix["fmnmx"]:
                kind = "online-softmax"
            result.append(dict(start=f"{code[blocks[h][0]][0]:#x}", end=f"{code[blocks[latch][1]][0]:#x}",
                               instructions=len(ops), mma=mma, per_mma=round(len(ops) / mma, 1), kind=kind,
                               mix=mix))
    return result
