"""The networks: teachers (registry, loading), the one UNet-to-eps wrapper, one UNet in three roles, text encoding."""
