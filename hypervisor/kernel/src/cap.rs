//! Capabilities to kernel objects.

use alloc::sync::Arc;

use crate::ec::Ec;
use crate::pd::Pd;
use crate::pt::Pt;
use crate::sc::Sc;
use crate::sm::Sm;

/// A reference to a kernel object.
#[derive(Clone)]
pub enum KObj {
    /// Protection domain.
    Pd(Arc<Pd>),
    /// Execution context.
    Ec(Arc<Ec>),
    /// Scheduling context.
    Sc(Arc<Sc>),
    /// Portal.
    Pt(Arc<Pt>),
    /// Semaphore.
    Sm(Arc<Sm>),
}

impl KObj {
    /// Whether two references name the same object.
    pub fn same(&self, o: &KObj) -> bool {
        match (self, o) {
            (KObj::Pd(a), KObj::Pd(b)) => Arc::ptr_eq(a, b),
            (KObj::Ec(a), KObj::Ec(b)) => Arc::ptr_eq(a, b),
            (KObj::Sc(a), KObj::Sc(b)) => Arc::ptr_eq(a, b),
            (KObj::Pt(a), KObj::Pt(b)) => Arc::ptr_eq(a, b),
            (KObj::Sm(a), KObj::Sm(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// A capability: object and permissions.
pub type Cap = peregrine_core::capspace::Cap<KObj>;
