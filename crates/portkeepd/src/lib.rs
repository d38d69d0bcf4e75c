//! Portkeep server runtime.
