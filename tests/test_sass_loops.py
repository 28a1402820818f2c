"""seg4diff_fast.sass_loops on handcrafted SASS (``cuobjdump -sass`` format) with known loops: no compiler needed."""
from seg4diff_fast.sass_loops import mma_loops, parse_sass


def _sass(lines):
    """cuobjdump-style text: one ``/*addr*/ instruction ;`` line (and its control-code line) per instruction,
    addresses 0x10 apart."""
    out = ["\tcode for sm_90a", "\t\tFunction : k"]
    for i, text in enumerate(lines):
        out.append(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x000000000000794d */")
        out.append("                                                     /* 0x000fea0003800000 */")
    return "\n".join(out) + "\n"


# 0x00-0x20: entry; 0x30-0x130 (header 0x30): the outer loop over heads, holding
#   0x50-0xf0: the inner loop (header 0x50, back edge at 0xf0) with 2 HGMMA, whose mbarrier wait retries
#   out of line at 0x150-0x170 (after EXIT) and jumps back into it;
#   0x100-0x110: a spin loop without tensor-core instructions.
KERNEL = [
    "S2R R0, SR_TID.X",                          # 0x00
    "ISETP.GE.AND P0, PT, R0, 0x80, PT",         # 0x10
    "@P0 EXIT",                                  # 0x20
    "MOV R2, RZ",                                # 0x30  outer header
    "IADD3 R3, R2, 0x1, RZ",                     # 0x40
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R3",  # 0x50  inner header
    "@!P1 BRA 0x150",                            # 0x60  wait not done: out of line
    "HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ",    # 0x70
    "FMNMX R4, R24, R25, !PT",                   # 0x80
    "FFMA R5, R24, R6, -R4",                     # 0x90
    "MUFU.EX2 R5, R5",                           # 0xa0
    "FSEL R5, R5, RZ, P2",                       # 0xb0
    "HGMMA.64x64x16.F32 R32, R5, gdesc[UR12], R32",  # 0xc0
    "ISETP.GE.AND P3, PT, R2, R7, PT",           # 0xd0
    "F2FP.F16.F32.PACK_AB R8, R5, R5",           # 0xe0
    "@!P3 BRA 0x50",                             # 0xf0  inner back edge
    "BAR.SYNC.DEFER_BLOCKING 0x0",               # 0x100 spin loop (no MMA)
    "@!P0 BRA 0x100",                            # 0x110
    "ISETP.GE.AND P4, PT, R2, 0x4, PT",          # 0x120
    "@!P4 BRA 0x30",                             # 0x130 outer back edge
    "EXIT",                                      # 0x140
    "SYNCS.PHASECHK.TRANS64 P1, [UR4], R3",      # 0x150 out-of-line retry ...
    "@!P1 BRA 0x150",                            # 0x160 ... spins on itself
    "BRA 0x70",                                  # 0x170 ... and jumps back into the loop
]


def test_the_innermost_mma_loop_and_its_mix():
    (loop,) = mma_loops(_sass(KERNEL))
    assert (loop["start"], loop["end"]) == ("0x50", "0xf0")
    # 0x50..0xf0: 11 instructions, the out-of-line retry (0x150-0x170) not counted.
    assert loop["instructions"] == 11 and loop["mma"] == 2 and loop["per_mma"] == 5.5
    assert loop["kind"] == "online-softmax"
    assert loop["mix"] == dict(ex2=1, ffma=1, fmul=0, fadd=0, fmnmx=1, select=1, compare=1, barrier=1, ldst=0,
                               convert=1, other=2)  # other: the two BRA


def test_kinds_and_loops_without_mma():
    no_max = [t for t in KERNEL if not t.startswith("FMNMX")]
    (loop,) = mma_loops(_sass(no_max))
    assert loop["kind"] == "exp" and loop["instructions"] == 10
    no_exp = [t for t in no_max if not t.startswith("MUFU")]
    assert mma_loops(_sass(no_exp))[0]["kind"] == "mma"
    no_mma = [t.replace("HGMMA.64x64x16.F32", "FMUL") for t in KERNEL]
    assert mma_loops(_sass(no_mma)) == []


def test_the_outer_loop_counts_when_it_holds_the_mma_directly():
    """Without the inner back edge the MMA sits in the outer loop, which then is the innermost MMA loop."""
    flat = [t.replace("@!P3 BRA 0x50", "NOP") for t in KERNEL]
    (loop,) = mma_loops(_sass(flat))
    assert (loop["start"], loop["end"]) == ("0x30", "0x130")
    assert loop["mma"] == 2 and loop["instructions"] == 17  # 0x30..0x130, the spin loop's 2 included


def test_a_uniform_branch_with_a_predicate_operand_is_conditional():
    """sm100a's loops close with ``BRA.U !UP0, target``: it falls through as well as branching back."""
    uniform = [t.replace("@!P4 BRA 0x30", "BRA.U !UP0, 0x30").replace("@!P3 BRA 0x50", "BRA.U UP1, 0x50")
               for t in KERNEL]
    (loop,) = mma_loops(_sass(uniform))
    assert (loop["start"], loop["end"], loop["instructions"]) == ("0x50", "0xf0", 11)
    always = [t.replace("@!P3 BRA 0x50", "BRA.U UPT, 0x50") for t in KERNEL]  # no fallthrough: 0x100.. unreachable
    assert [(loop["start"], loop["end"]) for loop in mma_loops(_sass(always))] == [("0x50", "0xf0")]


def test_a_loop_left_by_a_call_without_return_address():
    """sm80 loops may end ``@!P3 CALL.REL.NOINC exit; BRA header``: the call is the loop's conditional exit, so the
    loop sits inside the outer loop (which holds a peeled MMA block of its own) and only the inner one is kept."""
    kernel = [
        "S2R R0, SR_TID.X",                  # 0x00
        "MOV R2, RZ",                        # 0x10 outer header
        "@P0 BRA 0x90",                      # 0x20 zero trips: skip the inner loop
        "HMMA.16816.F32 R4, R8, R12, R4",    # 0x30 inner header
        "FMNMX R6, R4, R5, !PT",             # 0x40
        "MUFU.EX2 R5, R5",                   # 0x50
        "HMMA.16816.F32 R4, R8, R12, R4",    # 0x60
        "@!P3 CALL.REL.NOINC 0x90",          # 0x70 the inner loop's exit
        "BRA 0x30",                          # 0x80 inner back edge
        "HMMA.16816.F32 R4, R8, R12, R4",    # 0x90 the peeled block
        "ISETP.GE.AND P4, PT, R2, 0x4, PT",  # 0xa0
        "@!P4 BRA 0x10",                     # 0xb0 outer back edge
        "EXIT",                              # 0xc0
    ]
    (loop,) = mma_loops(_sass(kernel))
    assert (loop["start"], loop["end"], loop["instructions"], loop["mma"]) == ("0x30", "0x80", 6, 2)


def test_loops_behind_an_indirect_branch():
    """sm100a's warp-specialised kernels dispatch their partitions with ``BRX``: the partitions' loops count."""
    kernel = [
        "S2R R0, SR_TID.X",                  # 0x00
        "BRX R2 -0x20",                      # 0x10 to a partition (targets unknown)
        "EXIT",                              # 0x20 partition 1: nothing
        "MOV R2, RZ",                        # 0x30 partition 2 (no predecessor)
        "UTCHMMA gdesc[UR4], gdesc[UR10], tmem[UR7], tmem[UR18], idesc[UR19], !UPT",  # 0x40 loop header
        "UTCHMMA gdesc[UR4], gdesc[UR10], tmem[UR7], tmem[UR18], idesc[UR19], UPT",   # 0x50
        "UTCBAR [UR5], URZ",                 # 0x60
        "BRA.U !UP0, 0x40",                  # 0x70 back edge
        "EXIT",                              # 0x80
    ]
    (loop,) = mma_loops(_sass(kernel))
    assert (loop["start"], loop["end"], loop["instructions"], loop["mma"]) == ("0x40", "0x70", 4, 2)
    assert loop["kind"] == "mma"
    assert loop["mix"]["barrier"] == 1


def test_sm80_and_sm100_tensor_core_mnemonics_and_two_functions():
    sm80 = [t.replace("HGMMA.64x64x16.F32", "HMMA.16816.F32") for t in KERNEL]
    sm100 = [t.replace("HGMMA.64x64x16.F32", "UTCHMMA") for t in KERNEL]
    sm100 = [t.replace("FMNMX R4", "FMNMX3 R4").replace("FFMA R5", "FFMA2 R5") for t in sm100]
    text = _sass(sm80) + _sass(sm100).replace("Function : k", "Function : k2")
    assert len(parse_sass(text)) == 2
    loops = mma_loops(text)
    assert [loop["mma"] for loop in loops] == [2, 2] and loops[0]["mix"] == loops[1]["mix"]
    assert loops[1]["kind"] == "online-softmax"
