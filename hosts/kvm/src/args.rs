//! The command line.

use std::fmt;

use peregrine_vmm::testdev::Mode;

/// The usage text.
pub const USAGE: &str = "usage: vmm-kvm [--mode check|bench|hostile|loops] [--cpus 1|2] \
[--seed N] [--memory MIB] [--timeout S] [--irqchip user|kernel] GUEST.elf
       vmm-kvm --linux BZIMAGE [--initrd FILE] [--disk FILE] [--append CMDLINE] [--cpus N] \
[--memory MIB] [--timeout S]";

/// The VM to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The test guest's ELF image.
    pub guest: String,
    /// What the guest runs (with the hostile mode's seed, the loops' flags).
    pub mode: Mode,
    /// vCPUs (1 or 2).
    pub cpus: u32,
    /// Guest RAM in MiB (from guest-physical 0).
    pub memory_mib: u64,
    /// Wall-time limit in seconds (0: none).
    pub timeout_s: u64,
    /// Where the interrupt controller lives.
    pub irqchip: Irqchip,
    /// Boot this Linux guest on the library's PC (`peregrine_vmm::pc::Pc`) instead of
    /// the test guest.
    pub linux: Option<Linux>,
}

/// The Linux guest: the PC's kernel, initramfs, disk and command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Linux {
    /// The bzImage.
    pub kernel: String,
    /// The initramfs.
    pub initrd: Option<String>,
    /// The virtio-blk disk's image (a RAM disk: writes stay in memory).
    pub disk: Option<String>,
    /// The kernel command line.
    pub append: String,
}

/// The interrupt controller set-up of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irqchip {
    /// No in-kernel irqchip: `hlt` exits to user space and the machine's HLT handler
    /// answers it (the test machine injects its wake vector, `KVM_INTERRUPT`), as on
    /// Peregrine, where the VMM sees every HLT.
    User,
    /// `KVM_CREATE_IRQCHIP` (PIC, IOAPIC and LAPIC in KVM, as QEMU and Firecracker use
    /// it): `hlt` stays in KVM; a waker thread raises an edge on the in-kernel PIC's IRQ 0
    /// (programmed to the wake vector, auto-EOI, as the guest's handler sends no EOI)
    /// when the vCPU thread blocks in it. One vCPU only.
    Kernel,
}

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
    let mut mode = String::from("check");
    let mut seed = 0;
    let mut c = Config {
        guest: String::new(),
        mode: Mode::Check,
        cpus: 1,
        memory_mib: 16,
        timeout_s: 0,
        irqchip: Irqchip::User,
        linux: None,
    };
    let mut memory = None;
    let mut linux = Linux::default();
    let text =
        |flag: &str, v: Option<String>| v.ok_or_else(|| ArgError(format!("{flag} needs a value")));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => mode = args.next().unwrap_or_default(),
            "--cpus" => {
                c.cpus = match number(&a, args.next())? {
                    n @ 1..=2 => n as u32,
                    n => return Err(ArgError(format!("--cpus: 1 or 2, not {n}"))),
                }
            }
            "--seed" => seed = number(&a, args.next())?,
            "--memory" => {
                let m = number(&a, args.next())?;
                if !(4..=3072).contains(&m) {
                    return Err(ArgError("--memory: 4 to 3072 MiB".into()));
                }
                memory = Some(m);
            }
            "--linux" => linux.kernel = text(&a, args.next())?,
            "--initrd" => linux.initrd = Some(text(&a, args.next())?),
            "--disk" => linux.disk = Some(text(&a, args.next())?),
            "--append" => linux.append = text(&a, args.next())?,
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
    c.mode = Mode::parse(&mode, seed)
        .ok_or_else(|| ArgError(format!("--mode: unknown mode {mode:?}")))?;
    if !linux.kernel.is_empty() {
        if !c.guest.is_empty() {
            return Err(ArgError("--linux boots Linux: no guest ELF besides".into()));
        }
        if c.irqchip == Irqchip::Kernel {
            return Err(ArgError(
                "--linux: the PC's interrupt controllers are its own".into(),
            ));
        }
        c.memory_mib = memory.unwrap_or(256);
        c.linux = Some(linux);
        return Ok(c);
    }
    if linux != Linux::default() {
        return Err(ArgError(
            "--initrd, --disk and --append need --linux".into(),
        ));
    }
    c.memory_mib = memory.unwrap_or(16);
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
        assert_eq!(c.mode, Mode::Hostile(16));
        assert_eq!((c.cpus, c.memory_mib, c.timeout_s), (2, 32, 5));
        assert_eq!(c.guest, "g");
        let d = parse_args(args("g")).unwrap();
        assert_eq!((d.mode, d.cpus, d.memory_mib), (Mode::Check, 1, 16));
        assert_eq!(d.irqchip, Irqchip::User);
        let k = parse_args(args("--mode bench --irqchip kernel g")).unwrap();
        assert_eq!((k.mode, k.irqchip), (Mode::Bench, Irqchip::Kernel));
        let linux = parse_args(args("--linux bz --initrd i --cpus 2")).unwrap();
        assert_eq!(linux.memory_mib, 256);
        let l = linux.linux.unwrap();
        assert_eq!((l.kernel.as_str(), l.initrd.as_deref()), ("bz", Some("i")));
        assert_eq!((l.disk, l.append.as_str()), (None, ""));
        let mut a = args("--linux bz --memory 128 --append");
        a.push("console=ttyS0 quiet".into());
        let la = parse_args(a).unwrap();
        assert_eq!(la.memory_mib, 128);
        assert_eq!(la.linux.unwrap().append, "console=ttyS0 quiet");
        let l = parse_args(args("--seed 1 --mode loops g")).unwrap();
        assert_eq!(l.mode, Mode::Loops(1), "the seed may come first");
    }

    #[test]
    fn rejects_bad_arguments() {
        for bad in [
            "--cpus 3 g",
            "--mode fast g",
            "--seed x g",
            "",
            "a b",
            "--memory 1 g",
            "--irqchip both g",
            "--irqchip kernel --cpus 2 g",
            "--frob g",
            "--linux bz g",
            "--disk d g",
            "--linux bz --irqchip kernel",
            "--linux",
        ] {
            assert!(parse_args(args(bad)).is_err(), "{bad:?}");
        }
    }
}
