//! The platform-neutral VMM library.
#![cfg_attr(not(test), no_std)]
