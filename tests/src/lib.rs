//! Emulator integration tests.
