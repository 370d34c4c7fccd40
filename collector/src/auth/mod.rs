//! Who is calling: the identity an agent's client certificate proves, and (for people) the
//! bearer token's name and role. Depends only on the proto crate and the store; the gRPC
//! services read identities from here, never from what a caller says about itself.

/// What an agent's client certificate proves: the agent id and host id it was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub agent_id: String,
    pub host_id: String,
    /// Serial number of the certificate, hex.
    pub serial: String,
}

/// The certified identity of the peer of `request`, when its connection presented a client
/// certificate the collector's CA issued. The transport layer puts it into the request's
/// extensions; nothing a client sends in a message can set it.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    request.extensions().get::<PeerIdentity>().cloned()
}
