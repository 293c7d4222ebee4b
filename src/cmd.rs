//! Run an external tool (iscsiadm, qemu-img) with arguments passed as a vector (never a shell),
//! a bounded run time, and secrets masked in logs and errors.
use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use log::debug;

use crate::error::{Error, Kind, Result};

pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `text` with every occurrence of each non-empty secret replaced by `***`: for anything a
/// message or log line shows that may carry one (arguments, a tool's output).
pub fn mask(text: &str, secrets: &[&str]) -> String {
    secrets.iter().filter(|s| !s.is_empty()).fold(text.to_string(), |t, s| t.replace(s, "***"))
}

/// Run `program args...`; `secret` words are shown as `***`. Fails with `kind` when the tool
/// cannot start or outlives `timeout`; a non-zero exit is returned, not an error.
pub fn run(kind: Kind, program: &str, args: &[&str], secrets: &[&str], timeout: Duration) -> Result<Output> {
    let shown = std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    let shown = mask(&shown, secrets);
    debug!("run: {shown}");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::new(kind, format!("cannot run {program}: {e}")))?;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| Error::new(kind, format!("{shown}: {e}")))? {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::new(kind, format!("{shown}: no answer within {}s, killed", timeout.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    debug!("ran: {shown} in {:.3}s (exit {:?})", start.elapsed().as_secs_f64(), status.code());
    Ok(Output { status: status.code().unwrap_or(-1), stdout, stderr })
}

/// Like `run`, but a non-zero exit is an error naming the command and its stderr.
pub fn check(kind: Kind, program: &str, args: &[&str], secrets: &[&str], timeout: Duration) -> Result<Output> {
    let out = run(kind, program, args, secrets, timeout)?;
    if out.status != 0 {
        let shown = format!("{program} {} failed (exit {}): {}", args.join(" "), out.status, out.stderr.trim());
        return Err(Error::new(kind, mask(&shown, secrets)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_the_error_and_the_log_also_inside_words_and_output() {
        let secret = "Zq7secretValue9";
        let cap = crate::testlog::capture();
        // The tool echoes its argument to stderr and fails: the secret is in the argv (as a
        // word and inside one) and in the tool's output.
        let e = check(
            Kind::Iscsi,
            "sh",
            &["-c", "echo \"bad $0 $1\" >&2; exit 3", secret, &format!("--password={secret}")],
            &[secret],
            Duration::from_secs(10),
        )
        .err()
        .expect("exit 3 is an error");
        assert!(e.message.contains("exit 3") && e.message.contains("***"), "{}", e.message);
        assert!(!e.message.contains(secret), "{}", e.message);
        assert!(cap.lines().iter().any(|l| l.contains("run: sh")), "the command was logged: {:?}", cap.lines());
        cap.assert_absent(secret);
    }
}
