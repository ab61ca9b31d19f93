//! Host networking: bridge, TAP, IP leases, nftables, CNI
