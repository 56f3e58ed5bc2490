//! Running an emulator with a hard time limit.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How a process run under a time limit ended.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    /// It exited by itself.
    Exited(ExitStatus),
    /// It ran past its limit and was killed.
    TimedOut,
}

/// Spawns `cmd` and waits for it, at most `timeout`. A process still running then gets
/// SIGTERM (QEMU then restores the terminal and exits cleanly) and, two seconds later,
/// SIGKILL. Returns how it ended and the wall time it ran.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<(Ended, Duration)> {
    let (ended, wall) = run_until(cmd, timeout, || false)?;
    Ok((ended.unwrap_or(Ended::TimedOut), wall))
}

/// [`run_with_timeout`] that also ends the process (the same way) as soon as `stop`
/// returns true, polled every 10 ms: then how it ended is `None`.
pub fn run_until(
    cmd: &mut Command,
    timeout: Duration,
    stop: impl FnMut() -> bool,
) -> Result<(Option<Ended>, Duration)> {
    run_until_with(cmd, timeout, stop, |child, _| terminate(child))
}

/// [`run_until`] that kills the process with SIGKILL at once when `stop` returns true,
/// as a power cut would end a machine (no chance to flush anything); a process that
/// runs past `timeout` still ends as [`run_with_timeout`] ends it.
pub fn run_until_killed(
    cmd: &mut Command,
    timeout: Duration,
    stop: impl FnMut() -> bool,
) -> Result<(Option<Ended>, Duration)> {
    run_until_with(cmd, timeout, stop, |child, stopped| {
        if !stopped {
            return terminate(child);
        }
        child.kill().ok();
        child.wait()?;
        Ok(())
    })
}

fn run_until_with(
    cmd: &mut Command,
    timeout: Duration,
    mut stop: impl FnMut() -> bool,
    end: impl FnOnce(&mut Child, bool) -> Result<()>,
) -> Result<(Option<Ended>, Duration)> {
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", crate::workspace::describe(cmd)))?;
    let deadline = start + timeout;
    loop {
        let step = (Instant::now() + Duration::from_millis(100)).min(deadline);
        if let Some(status) = wait_until(&mut child, step)? {
            return Ok((Some(Ended::Exited(status)), start.elapsed()));
        }
        let stopped = stop();
        if stopped || Instant::now() >= deadline {
            let wall = start.elapsed();
            end(&mut child, stopped)?;
            return Ok(((!stopped).then_some(Ended::TimedOut), wall));
        }
    }
}

/// Waits for `child` until `deadline`; `None` if it is still running then.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// Ends `child`: SIGTERM, then SIGKILL if it has not exited two seconds later.
fn terminate(child: &mut Child) -> Result<()> {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped yet
        // (try_wait returned None), so the pid still names that child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if wait_until(child, Instant::now() + Duration::from_secs(2))?.is_none() {
        child.kill().ok();
        child.wait()?;
    }
    Ok(())
}
