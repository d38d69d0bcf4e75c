//! The parts of the `portkeep` command line that other programs and the
//! fuzz targets use: the agent's local API as an application writes it,
//! and the parsers of the command line's values.

pub mod api;
pub mod parse;
