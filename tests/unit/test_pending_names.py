"""Pure parts of pending probes: module names as users write them, the module part of a
pattern, the loader hook's action (assembles, saves what it clobbers)."""

from __future__ import annotations

from iced_x86 import Decoder, Mnemonic, Register

from djprobe.errors import SymbolNotFoundError
from djprobe.loader import loader_action
from djprobe.pending import is_missing_module, pattern_module
from djprobe.stubs import assemble
from djprobe.symbols import _stem_match


def test_extension_module_stems():
    assert _stem_match("_json.cpython-311-x86_64-linux-gnu.so", "_json")
    assert _stem_match("_sqlite3.cpython-311-x86_64-linux-gnu.so", "_sqlite3")
    assert _stem_match("speedups.abi3.so", "speedups")
    assert _stem_match("libsqlite3.so.0.8.6", "libsqlite3")
    assert not _stem_match("_json.cpython-311-x86_64-linux-gnu.so", "_js")
    assert not _stem_match("_jsonx.cpython-311-x86_64-linux-gnu.so", "_json")
    assert not _stem_match("libc.so.6", "lib")


def test_pattern_module():
    assert pattern_module("libsqlite3:sqlite3_step") == "libsqlite3"
    assert pattern_module("_json:*%return") == "_json"
    assert pattern_module("/usr/lib/x.so:f+0x4") == "/usr/lib/x.so"
    assert pattern_module("main") is None
    assert pattern_module("0x401000") is None


def test_missing_module_is_told_apart():
    assert is_missing_module(SymbolNotFoundError("no module 'x' (loaded: a)", reason="no module 'x'"))
    assert not is_missing_module(SymbolNotFoundError("no symbol 'f' in libc", reason="no symbol 'f'"))
    assert not is_missing_module(ValueError("no module"))


def test_loader_action_restores_every_register_it_uses():
    code = assemble(loader_action(0x7000_0000, 0x7100_0000, 0x7200_0000, 10**9, 3 * 10**10), 0x7000_1000)
    insns = list(Decoder(64, code, ip=0x7000_1000))
    pushes = [i.op0_register for i in insns if i.mnemonic == Mnemonic.PUSH and i.op0_kind == 0]
    pops = [i.op0_register for i in insns if i.mnemonic == Mnemonic.POP]
    assert pops == list(reversed(pushes))
    written = set()
    for i in insns:
        if i.mnemonic in (Mnemonic.PUSH, Mnemonic.POP):
            continue
        if i.op_count and i.op0_kind == 0:  # a register destination
            written.add(i.op0_register)
    full = {Register.EAX: Register.RAX, Register.EBX: Register.RBX, Register.EDX: Register.RDX,
            Register.ESI: Register.RSI, Register.R8D: Register.R8}  # fmt: skip
    clobbered = {full.get(r, r) for r in written} | {Register.RCX, Register.R11, Register.RAX}  # syscall
    clobbered.discard(Register.RSP)  # balanced: 16 bytes of timespec pushed and dropped
    assert clobbered <= set(pushes)
    assert sum(i.mnemonic == Mnemonic.SYSCALL for i in insns) == 2  # wake the tracer, wait


def test_fork_action_balances_the_stack_and_maps_only_in_the_child():
    from djprobe.forks import fork_action

    code = assemble(fork_action(0x7000_0000, 0x7100_0900), 0x7000_1000)
    insns = list(Decoder(64, code, ip=0x7000_1000))
    pushes = [i.op0_register for i in insns if i.mnemonic == Mnemonic.PUSH]
    pops = [i.op0_register for i in insns if i.mnemonic == Mnemonic.POP]
    assert pops == list(reversed(pushes))
    assert insns[0].mnemonic == Mnemonic.LEA and insns[0].memory_displacement == (-128) & 0xFFFFFFFFFFFFFFFF
    assert insns[-1].mnemonic == Mnemonic.LEA and insns[-1].memory_displacement == 128
    assert [i.mnemonic for i in insns].count(Mnemonic.PUSHFQ) == 1 == [i.mnemonic for i in insns].count(Mnemonic.POPFQ)
    # the mmap loop is reached only through the branch taken when rax == 0 (the child)
    test = next(k for k, i in enumerate(insns) if i.mnemonic == Mnemonic.TEST)
    assert insns[test + 1].mnemonic == Mnemonic.JE
    child = insns[test + 1].near_branch_target
    syscall = next(i for i in insns if i.mnemonic == Mnemonic.SYSCALL)
    assert syscall.ip > child
