//! What can go wrong choosing parents or moving a record through the join protocol.

use std::fmt;

use super::JoinState;

/// Which slot a parent gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// Why a previously made choice no longer holds (see [`super::validate_choice`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleReason {
    /// The parent is not among the peers any more.
    Missing,
    /// The parent is not Ready.
    NotReady { state: JoinState },
    /// The parent has no free slot of that role.
    Full { role: Role, children: u32, cap: u32 },
    /// The parent descends from the newcomer (would form a cycle).
    Descendant,
    /// The parent is the newcomer itself.
    IsNewcomer,
    /// The primary's depth changed: the placement's depth is wrong.
    DepthChanged { placed: u32, expected: u32 },
}

/// Everything that can go wrong. Each variant names the bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// A policy knob is out of range.
    InvalidPolicy { field: &'static str, value: u32, reason: &'static str },
    /// A host name is empty; `what` says which one (`newcomer.host`,
    /// `peers[3].host`).
    EmptyHost { what: String },
    /// A host uses the reserved name [`super::ORIGIN`].
    ReservedHost { host: String },
    /// Two peers have the same host.
    DuplicateHost { host: String },
    /// A peer's depth is invalid (0 is the origin's).
    InvalidDepth { host: String, depth: u32 },
    /// No Ready parent has a free slot: the origin and `ready_full` Ready
    /// peers are full, and `joining` peers are not verified yet. Retry later.
    NoFreeParent { ready_full: usize, joining: usize },
    /// A choice made on an older snapshot no longer holds; choose again.
    Stale { parent: String, reason: StaleReason },
    /// A placement is not shaped as [`super::choose_parents`] shapes it.
    MalformedPlacement { reason: String },
    /// A host's own record may not go from `from` (`None`: no record) to `to`
    /// (see [`JoinState::may_follow`]).
    Transition { from: Option<JoinState>, to: JoinState },
}

impl PlacementError {
    /// True for outcomes that a later retry may resolve (the tree changes),
    /// false for bad input.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PlacementError::NoFreeParent { .. } | PlacementError::Stale { .. })
    }
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementError::InvalidPolicy { field, value, reason } => write!(f, "invalid policy: {field} = {value}: {reason}"),
            PlacementError::EmptyHost { what } => write!(f, "{what} is empty"),
            PlacementError::ReservedHost { host } => {
                write!(f, "host name {host:?} is reserved for the origin")
            }
            PlacementError::DuplicateHost { host } => {
                write!(f, "host {host:?} appears more than once among the peers")
            }
            PlacementError::InvalidDepth { host, depth } => {
                write!(f, "peer {host:?} has invalid depth {depth} (the origin's children have depth 1)")
            }
            PlacementError::NoFreeParent { ready_full, joining } => write!(
                f,
                "no Ready parent has a free slot (origin full, {ready_full} Ready peers full, \
                 {joining} peers still joining); retry later"
            ),
            PlacementError::Stale { parent, reason } => {
                write!(f, "choice of parent {parent:?} is stale: ")?;
                match reason {
                    StaleReason::Missing => write!(f, "it is no longer a peer"),
                    StaleReason::NotReady { state } => write!(f, "it is {state}, not ready"),
                    StaleReason::Full { role, children, cap } => write!(f, "its {role:?} slots are full ({children}/{cap})"),
                    StaleReason::Descendant => write!(f, "it descends from the newcomer"),
                    StaleReason::IsNewcomer => write!(f, "it is the newcomer itself"),
                    StaleReason::DepthChanged { placed, expected } => {
                        write!(f, "the placement says depth {placed} but the primary now gives {expected}")
                    }
                }
            }
            PlacementError::MalformedPlacement { reason } => {
                write!(f, "malformed placement: {reason}")
            }
            PlacementError::Transition { from, to } => match from {
                Some(from) => write!(f, "a record that is {from} may not become {to}"),
                None => write!(f, "a host that has no record may not publish one that is {to}"),
            },
        }
    }
}

impl std::error::Error for PlacementError {}
