//! PCP client.
