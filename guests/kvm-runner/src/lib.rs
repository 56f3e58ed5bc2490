//! The KVM runner's logic that needs no KVM, host-tested: the guest's ELF image, the
//! entry state of the contract (`guests/README.md`: identity-mapped 4 GiB with 2 MiB
//! pages, a flat GDT), the devices of the contract (console, ports, the MMIO register,
//! the synthetic MSR) as a plain state machine, and the command line.
//!
//! `main.rs` binds these to `/dev/kvm` (kvm-ioctls); the KVM baseline of
//! `cargo xtask bench vmexit` runs it inside an emulated Linux.

pub mod elf;
pub mod layout;
pub mod platform;

use std::fmt;

/// What the guest runs (`rsi` of the contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 1: the check list.
    Check,
    /// 2: the exit benchmark.
    Bench,
    /// 3: the hostile guest.
    Hostile,
    /// 4: the exception loops (#AC, #DB).
    Loops,
}

impl Mode {
    /// The value of `rsi`.
    pub fn rsi(self) -> u64 {
        match self {
            Mode::Check => guest_contract::MODE_CHECK,
            Mode::Bench => guest_contract::MODE_BENCH,
            Mode::Hostile => guest_contract::MODE_HOSTILE,
            Mode::Loops => guest_contract::MODE_LOOPS,
        }
    }
}

/// The runner's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The guest ELF.
    pub guest: String,
    /// What the guest runs.
    pub mode: Mode,
    /// vCPUs (1 or 2).
    pub cpus: u32,
    /// Seed of the hostile mode (`rcx`).
    pub seed: u64,
    /// Guest RAM in MiB (from guest-physical 0).
    pub memory_mib: u64,
    /// Wall-time limit in seconds (0: none).
    pub timeout_s: u64,
    /// Where the interrupt controller lives.
    pub irqchip: Irqchip,
}

/// The interrupt controller set-up of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irqchip {
    /// No in-kernel irqchip: `hlt` exits to the runner, which injects vector 0x30 with
    /// `KVM_INTERRUPT` (how the runner started; no real KVM VMM runs like this).
    User,
    /// `KVM_CREATE_IRQCHIP` (PIC, IOAPIC and LAPIC in KVM, as QEMU and Firecracker use
    /// it): `hlt` stays in KVM; a waker thread raises an edge on the in-kernel PIC's IRQ 0
    /// (programmed to vector 0x30, auto-EOI, as the guest's handler sends no EOI) when
    /// the vCPU thread blocks in it. One vCPU only.
    Kernel,
}

impl Irqchip {
    /// The name `--irqchip` takes.
    pub fn name(self) -> &'static str {
        match self {
            Irqchip::User => "user",
            Irqchip::Kernel => "kernel",
        }
    }
}

/// The usage text.
pub const USAGE: &str = "usage: kvm-runner [--mode check|bench|hostile] [--cpus 1|2] [--seed N] \
[--memory MIB] [--timeout S] [--irqchip user|kernel] GUEST.elf";

/// A command-line error (its text is the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError(pub String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{USAGE}", self.0)
    }
}

impl std::error::Error for ArgError {}

fn number(flag: &str, v: Option<String>) -> Result<u64, ArgError> {
    let v = v.ok_or_else(|| ArgError(format!("{flag} needs a value")))?;
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.map_err(|_| ArgError(format!("{flag}: not a number: {v:?}")))
}

/// Parses the arguments (without the program name).
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Config, ArgError> {
    let mut args = args.into_iter();
    let mut c = Config {
        guest: String::new(),
        mode: Mode::Check,
        cpus: 1,
        seed: 0,
        memory_mib: 16,
        timeout_s: 0,
        irqchip: Irqchip::User,
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                c.mode = match args.next().as_deref() {
                    Some("check" | "1") => Mode::Check,
                    Some("bench" | "2") => Mode::Bench,
                    Some("hostile" | "3") => Mode::Hostile,
                    Some("loops" | "4") => Mode::Loops,
                    other => return Err(ArgError(format!("--mode: unknown mode {other:?}"))),
                }
            }
            "--cpus" => {
                c.cpus = match number(&a, args.next())? {
                    n @ 1..=2 => n as u32,
                    n => return Err(ArgError(format!("--cpus: 1 or 2, not {n}"))),
                }
            }
            "--seed" => c.seed = number(&a, args.next())?,
            "--memory" => {
                c.memory_mib = number(&a, args.next())?;
                if !(4..=3072).contains(&c.memory_mib) {
                    return Err(ArgError("--memory: 4 to 3072 MiB".into()));
                }
            }
            "--timeout" => c.timeout_s = number(&a, args.next())?,
            "--irqchip" => {
                c.irqchip = match args.next().as_deref() {
                    Some("user") => Irqchip::User,
                    Some("kernel") => Irqchip::Kernel,
                    other => {
                        return Err(ArgError(format!(
                            "--irqchip: user or kernel, not {other:?}"
                        )))
                    }
                }
            }
            s if s.starts_with("--") => return Err(ArgError(format!("unknown option {s:?}"))),
            s if c.guest.is_empty() => c.guest = s.to_string(),
            s => return Err(ArgError(format!("unexpected argument {s:?}"))),
        }
    }
    if c.guest.is_empty() {
        return Err(ArgError("no guest ELF given".into()));
    }
    if c.irqchip == Irqchip::Kernel && c.cpus != 1 {
        return Err(ArgError("--irqchip kernel: one vCPU only".into()));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_all_options() {
        let c = parse_args(args(
            "--mode hostile --cpus 2 --seed 0x10 --memory 32 --timeout 5 g",
        ))
        .unwrap();
        assert_eq!(c.mode, Mode::Hostile);
        assert_eq!(c.mode.rsi(), 3);
        assert_eq!((c.cpus, c.seed, c.memory_mib, c.timeout_s), (2, 16, 32, 5));
        assert_eq!(c.guest, "g");
        let d = parse_args(args("g")).unwrap();
        assert_eq!((d.mode, d.cpus, d.memory_mib), (Mode::Check, 1, 16));
        assert_eq!(d.irqchip, Irqchip::User);
        let k = parse_args(args("--mode bench --irqchip kernel g")).unwrap();
        assert_eq!(k.irqchip, Irqchip::Kernel);
        assert_eq!(k.irqchip.name(), "kernel");
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(parse_args(args("--cpus 3 g")).is_err());
        assert!(parse_args(args("--mode fast g")).is_err());
        assert!(parse_args(args("--seed x g")).is_err());
        assert!(parse_args(args("")).is_err());
        assert!(parse_args(args("a b")).is_err());
        assert!(parse_args(args("--memory 1 g")).is_err());
        assert!(parse_args(args("--irqchip both g")).is_err());
        assert!(parse_args(args("--irqchip kernel --cpus 2 g")).is_err());
    }
}
