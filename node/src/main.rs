fn main() { let _ = libp2p::identity::Keypair::generate_ed25519(); }
