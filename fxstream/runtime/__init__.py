"""Runtime modules that compiled graphs call: sliced groups and step-rehash control."""
