//! Undo log for a multi-step set-up: on failure every step this call made is undone in
//! reverse, and a failed undo becomes a `Rollback` error naming what was left behind.
use log::warn;

use crate::error::Error;
#[cfg(test)]
use crate::error::Kind;

type UndoFn<'a> = Box<dyn FnOnce() -> Result<(), String> + 'a>;

#[derive(Default)]
pub struct Undo<'a> {
    steps: Vec<(String, UndoFn<'a>)>,
}

impl<'a> Undo<'a> {
    pub fn push(&mut self, what: impl Into<String>, f: impl FnOnce() -> Result<(), String> + 'a) {
        self.steps.push((what.into(), Box::new(f)));
    }

    /// Success: keep everything.
    pub fn commit(mut self) {
        self.steps.clear();
    }

    /// Failure: undo in reverse and return the error to raise.
    pub fn rollback(mut self, cause: Error) -> Error {
        let mut left = Vec::new();
        while let Some((what, f)) = self.steps.pop() {
            if let Err(e) = f() {
                warn!("rollback: could not undo {what}: {e}");
                left.push(format!("{what} ({e})"));
            }
        }
        if left.is_empty() {
            cause
        } else {
            Error::rollback(cause, left)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn undoes_in_reverse_and_reports_leftovers() {
        let order = RefCell::new(vec![]);
        let mut u = Undo::default();
        u.push("a", || {
            order.borrow_mut().push("a");
            Ok(())
        });
        u.push("b", || {
            order.borrow_mut().push("b");
            Err("busy".into())
        });
        u.push("c", || {
            order.borrow_mut().push("c");
            Ok(())
        });
        let e = u.rollback(Error::invalid("boom"));
        assert_eq!(*order.borrow(), ["c", "b", "a"]);
        assert_eq!(e.kind, Kind::Rollback);
        assert!(e.message.contains("boom") && e.message.contains("b (busy)"), "{}", e.message);
        assert_eq!(e.left_behind, ["b (busy)"]);
    }

    #[test]
    fn clean_rollback_keeps_the_cause() {
        let mut u = Undo::default();
        u.push("a", || Ok(()));
        let e = u.rollback(Error::new(Kind::Iscsi, "login failed"));
        assert_eq!(e.kind, Kind::Iscsi);
    }
}
