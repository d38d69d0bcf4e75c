//! Sans-IO PCP server core.
