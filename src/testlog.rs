//! Tests only: every `log` record of the test process, at every level, kept as text, so a test
//! can assert what no log line carries (a secret).
use std::sync::{Mutex, Once};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        LINES.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{} {}: {}", r.level(), r.target(), r.args()));
    }
    fn flush(&self) {}
}

/// Lines logged from now on (other tests' lines may be among them).
pub struct Captured {
    from: usize,
}

pub fn capture() -> Captured {
    INSTALL.call_once(|| {
        log::set_boxed_logger(Box::new(Capture)).expect("no other logger in tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
    Captured { from: LINES.lock().unwrap_or_else(|p| p.into_inner()).len() }
}

impl Captured {
    pub fn lines(&self) -> Vec<String> {
        LINES.lock().unwrap_or_else(|p| p.into_inner())[self.from..].to_vec()
    }

    pub fn assert_absent(&self, needle: &str) {
        for l in self.lines() {
            assert!(!l.contains(needle), "a log line carries {needle:?}: {l}");
        }
    }
}
