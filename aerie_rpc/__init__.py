"""What the aerie services share: the generated wire contract (`aerie_rpc.v1`), tensor
encoding, service configuration from flags and environment, the server scaffold (health,
reflection, graceful shutdown), status mapping and tracing. No model code lives here."""
