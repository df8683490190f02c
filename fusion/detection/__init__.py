"""Model composition for object detection (paper 000, section 3.2): detector parties answer
with boxes on unlabeled canvases, the coordinator votes per object across distinct models,
thins each object's candidates with Soft-NMS and trains one detector for the union of the
categories."""
