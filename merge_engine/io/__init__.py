"""Model access: references, lazy checkpoint readers, layer layout, sharded writer."""
