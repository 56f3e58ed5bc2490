//! NUL runtime.
#![no_std]
