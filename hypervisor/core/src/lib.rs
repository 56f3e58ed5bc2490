//! Kernel logic that needs no hardware.
#![cfg_attr(not(test), no_std)]
