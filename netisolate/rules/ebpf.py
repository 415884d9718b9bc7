"""eBPF instructions as data, and the assembler that turns them into what BPF_PROG_LOAD takes. Pure.

A program is a list of `Insn` and `Label`s. Jumps name a label and map loads name a map; the
assembler resolves labels to offsets here and map names to file descriptors once the kernel has
made the maps (`encode`). `text` prints a program the way the kernel's verifier log does, which is
what the golden files hold. Only what our programs use is here (64-bit ALU, loads and stores,
jumps, helper calls, one atomic add), each opcode spelt from the instruction set's fields
(Documentation/bpf/standardization/instruction-set.rst).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# instruction classes
_LD, _LDX, _ST, _STX, _JMP, _JMP32, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x05, 0x06, 0x07
# sizes
SIZES = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_SIZE_NAMES = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}
_MEM, _IMM, _ATOMIC = 0x60, 0x00, 0xC0
_X = 0x08  # the source is a register, not the immediate
_ALU = {"+=": 0x00, "&=": 0x50, "<<=": 0x60, ">>=": 0x70, "=": 0xB0, "|=": 0x40}
_JUMPS = {"==": 0x10, "!=": 0x50, ">": 0x20, ">=": 0x30, "<": 0xA0, "&": 0x40}
_CALL, _EXIT = 0x80, 0x90
_PSEUDO_MAP_FD = 1
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)  # R10: the frame pointer, read-only


@dataclass(frozen=True)
class Label:
    name: str


@dataclass(frozen=True)
class Insn:
    """One instruction; `target` is a jump's label, `map` a map load's map name."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str = ""
    map: str = ""

    @property
    def slots(self) -> int:
        """A 64-bit immediate load takes two instruction slots."""
        return 2 if self.code == _LD | _IMM | SIZES[8] else 1


Program = Sequence[Insn | Label]


def alu(dst: int, op: str, value: int, *, reg: bool = False) -> Insn:
    """dst op= value (an immediate, or the register `value` when reg)."""
    code = _ALU64 | _ALU[op] | (_X if reg else 0)
    return Insn(code, dst, value, 0, 0) if reg else Insn(code, dst, 0, 0, value)


def mov(dst: int, src: int) -> Insn:
    return alu(dst, "=", src, reg=True)


def load(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off)"""
    return Insn(_LDX | _MEM | SIZES[size], dst, src, off)


def store(size: int, dst: int, off: int, src: int) -> Insn:
    """*(size *)(dst + off) = src (a register)"""
    return Insn(_STX | _MEM | SIZES[size], dst, src, off)


def store_imm(size: int, dst: int, off: int, imm: int) -> Insn:
    """*(size *)(dst + off) = imm"""
    return Insn(_ST | _MEM | SIZES[size], dst, 0, off, imm)


def atomic_add(dst: int, off: int, src: int) -> Insn:
    """*(u64 *)(dst + off) += src, atomically (a counter shared by every CPU)."""
    return Insn(_STX | _ATOMIC | SIZES[8], dst, src, off, 0x00)


def jump(dst: int, op: str, value: int, target: str, *, reg: bool = False, low32: bool = False) -> Insn:
    """if dst op value goto target (an immediate, or the register `value` when reg). An immediate
    is sign-extended to 64 bits; `low32` compares the low 32 bits instead (0xffff0000 as it is)."""
    code = (_JMP32 if low32 else _JMP) | _JUMPS[op] | (_X if reg else 0)
    return Insn(code, dst, value if reg else 0, 0, 0 if reg else value, target=target)


def goto(target: str) -> Insn:
    return Insn(_JMP, target=target)


def call(helper: int) -> Insn:
    return Insn(_JMP | _CALL, imm=helper)


def exit_with(value: int) -> list[Insn | Label]:
    return [alu(R0, "=", value), Insn(_JMP | _EXIT)]


def load_map(dst: int, name: str) -> Insn:
    """dst = the map `name` (its fd, which the kernel turns into the map's address)."""
    return Insn(_LD | _IMM | SIZES[8], dst, _PSEUDO_MAP_FD, map=name)


def _offsets(program: Program) -> dict[str, int]:
    labels, slot = {}, 0
    for item in program:
        if isinstance(item, Label):
            if item.name in labels:
                raise ValueError(f"label {item.name} defined twice")
            labels[item.name] = slot
        else:
            slot += item.slots
    return labels


def encode(program: Program, maps: Mapping[str, int]) -> bytes:
    """The program as the kernel takes it, with `maps` (name -> fd) filled in."""
    labels, slot, out = _offsets(program), 0, bytearray()
    for item in program:
        if isinstance(item, Label):
            continue
        off, imm = item.off, item.imm
        if item.target:
            off = labels[item.target] - (slot + 1)
        if item.map:
            imm = maps[item.map]
        if imm >= 1 << 31:  # only a 32-bit compare sees such a constant as it is written
            if item.code & 0x07 != _JMP32:
                raise ValueError(f"{imm:#x} would be sign-extended to 64 bits: compare with low32")
            imm -= 1 << 32
        out += struct.pack("<BBhi", item.code, item.src << 4 | item.dst, off, imm)
        if item.slots == 2:
            out += struct.pack("<BBhi", 0, 0, 0, 0)
        slot += item.slots
    return bytes(out)


def _operand(item: Insn) -> str:
    return f"r{item.src}" if item.code & _X else str(item.imm)


def _text(item: Insn) -> str:
    cls, size = item.code & 0x07, next((n for n, s in SIZES.items() if item.code & 0x18 == s), 4)
    where = f"(r{item.dst} {item.off:+d})"
    if item.code == _LD | _IMM | SIZES[8]:
        return f"r{item.dst} = map[{item.map}]"
    if cls == _LDX:
        return f"r{item.dst} = *({_SIZE_NAMES[size]} *)(r{item.src} {item.off:+d})"
    if cls == _STX and item.code & 0xE0 == _ATOMIC:
        return f"lock *(u64 *){where} += r{item.src}"
    if cls in (_ST, _STX):
        value = f"r{item.src}" if cls == _STX else str(item.imm)
        return f"*({_SIZE_NAMES[size]} *){where} = {value}"
    if cls == _ALU64:
        op = next(name for name, bits in _ALU.items() if bits == item.code & 0xF0)
        return f"r{item.dst} {op} {_operand(item)}"
    if item.code == _JMP | _CALL:
        return f"call {item.imm}"
    if item.code == _JMP | _EXIT:
        return "exit"
    if item.code == _JMP:
        return f"goto {item.target}"
    op = next(name for name, bits in _JUMPS.items() if bits == item.code & 0xF0)
    register = f"w{item.dst}" if cls == _JMP32 else f"r{item.dst}"
    return f"if {register} {op} {_operand(item)} goto {item.target}"


def text(program: Program) -> str:
    """One line per instruction, labels flush left: the golden files' form."""
    return "\n".join(f"{item.name}:" if isinstance(item, Label) else f"\t{_text(item)}" for item in program)
