//! CNI mode (placeholder while it is being built).

use crate::config::CniConfig;
use crate::error::{NetError, Result};
use crate::leasedb::IpLease;
use crate::manager::{NetworkAttachment, NetworkManager};

pub(crate) async fn setup(
    _m: &NetworkManager,
    _c: &CniConfig,
    _id: &str,
) -> Result<NetworkAttachment> {
    Err(NetError::Config("CNI mode is not available yet".into()))
}

pub(crate) async fn teardown(_m: &NetworkManager, _l: &IpLease) -> Result<()> {
    Ok(())
}
