//! The seccomp filter every run gets: a deny list of system calls no Python task needs and
//! that would let it reach past its sandbox (tracing other processes, mounting, entering or
//! making namespaces, kernel keyrings, io_uring, loading kernel code, rebooting).
//!
//! A deny list rather than an allow list: Python and the C extensions people import use a
//! wide and changing set of calls, and a task that fails on an unexpected EPERM is a worse
//! product than one whose dangerous calls are named and refused.
//!
//! The program is built here, not by `seccompiler` (which still installs it), because every
//! run installs it and the kernel's cost to install a filter grows with the path an allowed
//! system call takes through it: at install the kernel runs the filter once for every system
//! call number, under a spinlock, to find the ones it can skip it for (its action cache), then
//! translates and compiles it. `seccompiler` tests the numbers one after another, so an allowed
//! call walked all of them, in two programs (one per action); here it is one program and a
//! binary search, a handful of comparisons for any number. `perf` put a run's `seccomp` call
//! at ~0.13 ms of CPU with the two chained programs and ~0.04 ms with this one (BENCHMARKS.md,
//! eighth session).

use super::SandboxError;
use seccompiler::{BpfProgram, sock_filter};

/// System calls refused with EPERM.
const DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    // Another process's descriptor, on ptrace's terms.
    libc::SYS_pidfd_getfd,
    libc::SYS_mount,
    libc::SYS_umount2,
    // The newer mount API: the same powers as mount(2), in steps.
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
];

/// `clone` flags that create namespaces: refused like `unshare`. All in the low 32 bits of
/// the flags argument, the only ones `clone` reads (the kernel takes `lower_32_bits`).
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// On x86_64, system call numbers with this bit set are the x32 ABI's: the same calls under
/// other numbers, reported with the same architecture. A kernel built with x32 would let a
/// deny list be walked around through them, so the filter answers all of them ENOSYS (what
/// a kernel without x32 answers).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `AUDIT_ARCH_*` of the architecture this was built for (`EM_*` | 64-bit | little-endian).
/// Only 64-bit little-endian builds get a filter: the offsets below assume both (a big-endian
/// aarch64 kernel still reports the little-endian `AUDIT_ARCH`, and an x32 build's system
/// call numbers carry the bit the filter refuses).
fn audit_arch() -> Result<u32, SandboxError> {
    const ARCH_64_LE: u32 = 0x8000_0000 | 0x4000_0000;
    if !(cfg!(target_endian = "little") && cfg!(target_pointer_width = "64")) {
        return Err(SandboxError::Seccomp(
            "no seccomp filter for this target (64-bit little-endian only)".into(),
        ));
    }
    if cfg!(target_arch = "x86_64") {
        Ok(62 | ARCH_64_LE)
    } else if cfg!(target_arch = "aarch64") {
        Ok(183 | ARCH_64_LE)
    } else if cfg!(target_arch = "riscv64") {
        Ok(243 | ARCH_64_LE)
    } else {
        Err(SandboxError::Seccomp(
            "no seccomp filter for this architecture".into(),
        ))
    }
}

// `struct seccomp_data`: nr (u32), arch (u32), instruction_pointer (u64), args ([u64; 6]).
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
/// The low 32 bits of `args[0]` (little-endian: every architecture `audit_arch` knows).
const ARG0_LOW_OFFSET: u32 = 16;

const LD_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Where a jump goes: on to a later instruction of the search, or to one of the blocks at the
/// end of the program (every jump in classic BPF goes forward).
#[derive(Clone, Copy, Debug, PartialEq)]
enum To {
    Skip(usize),
    Block(Block),
}

/// The blocks after the search, in this order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Block {
    /// `clone`: refused if its flags make a namespace.
    Clone,
    Deny,
    NoSys,
    Allow,
    Kill,
}

const BLOCKS: [Block; 5] = [
    Block::Clone,
    Block::Deny,
    Block::NoSys,
    Block::Allow,
    Block::Kill,
];

#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u16,
    k: u32,
    jt: To,
    jf: To,
}

impl Insn {
    fn load(offset: u32) -> Self {
        Insn {
            code: LD_ABS,
            k: offset,
            jt: To::Skip(0),
            jf: To::Skip(0),
        }
    }

    fn jump(code: u16, k: u32, jt: To, jf: To) -> Self {
        Insn { code, k, jt, jf }
    }

    fn ret(value: u32) -> Self {
        Insn {
            code: RET,
            k: value,
            jt: To::Skip(0),
            jf: To::Skip(0),
        }
    }
}

/// How many numbers a leaf of the search tests one after another.
const LEAF: usize = 3;

/// A binary search for the accumulator (the system call's number) among `cases` (sorted):
/// a number found jumps to its block, any other to `Allow`.
fn search(cases: &[(u32, Block)], out: &mut Vec<Insn>) {
    if cases.len() <= LEAF {
        for &(nr, block) in cases {
            out.push(Insn::jump(JEQ, nr, To::Block(block), To::Skip(0)));
        }
        out.push(Insn::jump(JA, 0, To::Block(Block::Allow), To::Skip(0)));
        return;
    }
    let (below, from) = cases.split_at(cases.len() / 2);
    let at = out.len();
    out.push(Insn::jump(JGE, from[0].0, To::Skip(0), To::Skip(0)));
    search(below, out);
    out[at].jt = To::Skip(out.len() - at - 1);
    search(from, out);
}

/// A program whose jumps to blocks are not resolved yet, and where each block starts.
struct Assembled {
    program: Vec<Insn>,
    starts: [usize; BLOCKS.len()],
}

/// The whole filter: the architecture checked, then the number searched.
fn assemble() -> Result<Assembled, SandboxError> {
    let arch = audit_arch()?;
    let mut cases: Vec<(u32, Block)> = DENIED
        .iter()
        .map(|&nr| (nr, Block::Deny))
        .chain([
            (libc::SYS_clone, Block::Clone),
            // clone3 passes its flags in memory, where a filter cannot look: answer ENOSYS so
            // that libc falls back to clone, whose flags the filter checks.
            (libc::SYS_clone3, Block::NoSys),
        ])
        .map(|(nr, block)| {
            u32::try_from(nr)
                .map(|nr| (nr, block))
                .map_err(|_| SandboxError::Seccomp(format!("system call number {nr}")))
        })
        .collect::<Result<_, _>>()?;
    cases.sort_unstable_by_key(|&(nr, _)| nr);
    if cases.windows(2).any(|pair| pair[0].0 == pair[1].0) {
        return Err(SandboxError::Seccomp("a system call listed twice".into()));
    }

    let mut out = vec![
        Insn::load(ARCH_OFFSET),
        // Another architecture's calls (a 64-bit process can make i386 ones) carry other
        // numbers: the process is killed, as it would be by seccompiler's programs.
        Insn::jump(JEQ, arch, To::Skip(0), To::Block(Block::Kill)),
        Insn::load(NR_OFFSET),
    ];
    if cfg!(target_arch = "x86_64") {
        out.push(Insn::jump(
            JGE,
            X32_SYSCALL_BIT,
            To::Block(Block::NoSys),
            To::Skip(0),
        ));
    }
    search(&cases, &mut out);
    let mut starts = [0; BLOCKS.len()];
    for (index, block) in BLOCKS.into_iter().enumerate() {
        starts[index] = out.len();
        match block {
            Block::Clone => {
                out.push(Insn::load(ARG0_LOW_OFFSET));
                out.push(Insn::jump(
                    JSET,
                    NAMESPACE_FLAGS,
                    To::Block(Block::Deny),
                    To::Block(Block::Allow),
                ));
            }
            Block::Deny => out.push(Insn::ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32)),
            Block::NoSys => out.push(Insn::ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32)),
            Block::Allow => out.push(Insn::ret(libc::SECCOMP_RET_ALLOW)),
            Block::Kill => out.push(Insn::ret(libc::SECCOMP_RET_KILL_PROCESS)),
        }
    }
    Ok(Assembled {
        program: out,
        starts,
    })
}

/// Resolves every jump to the offset classic BPF wants (instructions to skip).
fn encode(assembled: &Assembled) -> Result<BpfProgram, SandboxError> {
    let Assembled { program, starts } = assembled;
    let offset = |at: usize, to: To| -> Result<usize, SandboxError> {
        match to {
            To::Skip(n) => Ok(n),
            To::Block(block) => BLOCKS
                .iter()
                .position(|b| *b == block)
                .and_then(|index| starts[index].checked_sub(at + 1))
                .ok_or_else(|| SandboxError::Seccomp("a jump backwards".into())),
        }
    };
    let short = |n: usize| {
        u8::try_from(n).map_err(|_| SandboxError::Seccomp("a jump too far for BPF".into()))
    };
    program
        .iter()
        .enumerate()
        .map(|(at, insn)| {
            let (jt, jf, k) = if insn.code == JA {
                let k = u32::try_from(offset(at, insn.jt)?)
                    .map_err(|_| SandboxError::Seccomp("a jump too far for BPF".into()))?;
                (0, 0, k)
            } else if insn.code == RET || insn.code == LD_ABS {
                (0, 0, insn.k)
            } else {
                (
                    short(offset(at, insn.jt)?)?,
                    short(offset(at, insn.jf)?)?,
                    insn.k,
                )
            };
            Ok(sock_filter {
                code: insn.code,
                jt,
                jf,
                k,
            })
        })
        .collect()
}

/// The program to install, built once per process: a zygote builds it before it forks (see
/// [`super::prepare`]), so its runs inherit it instead of building it on the fork path.
pub(super) fn programs() -> Result<&'static [BpfProgram], SandboxError> {
    static PROGRAMS: std::sync::OnceLock<Result<Vec<BpfProgram>, String>> =
        std::sync::OnceLock::new();
    PROGRAMS
        .get_or_init(|| {
            build()
                .map(|program| vec![program])
                .map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|e| SandboxError::Seccomp(e.clone()))
}

fn build() -> Result<BpfProgram, SandboxError> {
    encode(&assemble()?)
}

pub(super) fn install(programs: &[BpfProgram]) -> Result<(), SandboxError> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel passes a filter: `struct seccomp_data`, as bytes.
    fn data(arch: u32, nr: u32, arg0: u64) -> [u8; 64] {
        let mut bytes = [0u8; 64];
        bytes[0..4].copy_from_slice(&nr.to_ne_bytes());
        bytes[4..8].copy_from_slice(&arch.to_ne_bytes());
        bytes[16..24].copy_from_slice(&arg0.to_ne_bytes());
        bytes
    }

    /// Runs `program` as the kernel would on `input`, for the instructions this module emits:
    /// the verdict and how many instructions it took.
    fn run(program: &[sock_filter], input: &[u8; 64]) -> (u32, usize) {
        let mut acc = 0u32;
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            let insn = &program[pc];
            steps += 1;
            pc += 1;
            match insn.code {
                LD_ABS => {
                    let at = insn.k as usize;
                    let word: [u8; 4] = input[at..at + 4].try_into().expect("in bounds");
                    acc = u32::from_ne_bytes(word);
                }
                RET => return (insn.k, steps),
                JA => pc += insn.k as usize,
                JEQ | JGE | JSET => {
                    let taken = match insn.code {
                        JEQ => acc == insn.k,
                        JGE => acc >= insn.k,
                        _ => acc & insn.k != 0,
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    fn arch() -> u32 {
        audit_arch().expect("a known architecture")
    }

    #[test]
    fn every_listed_call_is_refused_and_every_other_allowed() {
        let program = build().expect("the filter builds");
        for nr in 0u32..1024 {
            let verdict = run(&program, &data(arch(), nr, 0)).0;
            let want = if DENIED.contains(&i64::from(nr)) {
                EPERM
            } else if i64::from(nr) == libc::SYS_clone3 {
                ENOSYS
            } else {
                libc::SECCOMP_RET_ALLOW
            };
            assert_eq!(verdict, want, "system call {nr}");
        }
    }

    #[test]
    fn clone_is_refused_exactly_when_it_would_make_a_namespace() {
        let program = build().expect("the filter builds");
        let clone = u32::try_from(libc::SYS_clone).expect("small");
        let fork = u64::from((libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u32)
            | libc::SIGCHLD as u64;
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        for allowed in [0, fork, thread, 1 << 40] {
            assert_eq!(
                run(&program, &data(arch(), clone, allowed)).0,
                libc::SECCOMP_RET_ALLOW,
                "clone flags {allowed:#x}"
            );
        }
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
        ] {
            for with in [0, fork, thread] {
                let flags = with | u64::from(flag as u32);
                assert_eq!(
                    run(&program, &data(arch(), clone, flags)).0,
                    EPERM,
                    "clone flags {flags:#x}"
                );
            }
        }
    }

    #[test]
    fn numbers_past_the_listed_ones_are_allowed_up_to_the_x32_bit() {
        let program = build().expect("the filter builds");
        let highest = DENIED.iter().copied().max().unwrap_or(0);
        for nr in [highest as u32 + 1, 1024, 4096, 0x3FFF_FFFF] {
            assert_eq!(
                run(&program, &data(arch(), nr, 0)).0,
                libc::SECCOMP_RET_ALLOW,
                "system call {nr:#x}"
            );
        }
        let past = if cfg!(target_arch = "x86_64") {
            ENOSYS
        } else {
            libc::SECCOMP_RET_ALLOW
        };
        for nr in [X32_SYSCALL_BIT, u32::MAX] {
            assert_eq!(run(&program, &data(arch(), nr, 0)).0, past, "{nr:#x}");
        }
    }

    /// The interpreter above shares the module's opcode constants; these are the values
    /// `linux/filter.h` and `linux/bpf_common.h` give them, independently.
    #[test]
    fn the_opcodes_are_the_kernel_s() {
        assert_eq!(
            (LD_ABS, JEQ, JGE, JSET, JA, RET),
            (0x20, 0x15, 0x35, 0x45, 0x05, 0x06)
        );
        let program = build().expect("the filter builds");
        assert_eq!((program[0].code, program[0].k), (0x20, ARCH_OFFSET));
        assert!(
            program
                .iter()
                .all(|insn| [0x20, 0x15, 0x35, 0x45, 0x05, 0x06].contains(&insn.code))
        );
    }

    #[test]
    fn another_architecture_is_killed_and_x32_numbers_get_enosys() {
        let program = build().expect("the filter builds");
        // AUDIT_ARCH_I386: a 64-bit process can still make 32-bit calls (int 0x80).
        assert_eq!(
            run(&program, &data(3 | 0x4000_0000, 39, 0)).0,
            libc::SECCOMP_RET_KILL_PROCESS
        );
        if cfg!(target_arch = "x86_64") {
            for nr in [0, 39, libc::SYS_mount as u32, libc::SYS_unshare as u32] {
                assert_eq!(
                    run(&program, &data(arch(), nr | X32_SYSCALL_BIT, 0)).0,
                    ENOSYS,
                    "x32 call {nr}"
                );
            }
        }
    }

    /// The point of building the program here: the kernel runs it for every system call
    /// number when it is installed, so an allowed call must reach its verdict in a few steps,
    /// not after a comparison with each listed number.
    #[test]
    fn any_call_reaches_its_verdict_in_a_few_instructions() {
        let program = build().expect("the filter builds");
        let longest = (0u32..1024)
            .map(|nr| run(&program, &data(arch(), nr, 0)).1)
            .max()
            .unwrap_or(0);
        // 3 loads and checks, ~log2(31 / LEAF) search steps, a leaf of LEAF, its jump,
        // the clone block and a return.
        assert!(longest <= 16, "{longest} instructions for one call");
        assert!(
            longest < DENIED.len(),
            "{longest} instructions for one call"
        );
    }
}
