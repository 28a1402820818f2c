"""The Seg4Diff protocol: image + class names -> masks; metrics; datasets."""
