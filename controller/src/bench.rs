//! `bulkhead bench <what>`, run by `cargo xtask bench`: numbers printed, and
//! one JSON object on the last line.

use anyhow::{bail, Result};

pub fn run(what: &str) -> Result<()> {
    match what {
        other => bail!("unknown benchmark {other:?}"),
    }
}
