"""The gRPC front door: ``omnigate.gateway.v1.GatewayService`` (``server.py``), over the shared core."""
