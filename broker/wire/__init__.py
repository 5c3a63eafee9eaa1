"""Sans-IO protocol code: handshake, frames, codecs, messages. Never touches a socket."""
